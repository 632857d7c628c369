"""Scorers that reproduce the official VoiceBench and MMAU rules; pure functions of (item, response), no model."""
