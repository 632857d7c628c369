"""Tests of report building and the check gate."""
