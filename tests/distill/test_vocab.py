"""Vocabulary checks on real tokenizers (the tiny pair's, freshly trained ones) and the cut of padded lm_head rows."""

from __future__ import annotations

import pytest
import torch

from speechlm_eval.distill.losses import kd_loss
from speechlm_eval.distill.vocab import (
    VocabMismatchError,
    align_logits,
    check_vocab_compatible,
    cut_padded_vocab,
    real_vocab_size,
)
from speechlm_eval.organism.tokenizer import train_tokenizer
from tests.fixtures.tiny_models import CORPUS

OTHER_CORPUS = ["Quantum chromodynamics describes quarks and gluons.", "Le chat dort sur le canapé rouge."] * 20


@pytest.fixture(scope="module")
def pair_tokenizers(tiny_pair):
    from transformers import AutoTokenizer

    speech_dir, text_dir = tiny_pair
    return AutoTokenizer.from_pretrained(text_dir), AutoTokenizer.from_pretrained(speech_dir)


def test_the_tiny_pair_shares_its_vocabulary(pair_tokenizers, tiny_pair):
    from transformers import AutoConfig

    teacher, student = pair_tokenizers
    check_vocab_compatible(teacher, student)
    assert real_vocab_size(teacher) == len(teacher.get_vocab()) == AutoConfig.from_pretrained(tiny_pair[1]).vocab_size


def test_tokenizers_trained_on_different_corpora_are_refused_naming_the_first_differing_id():
    teacher, student = train_tokenizer(CORPUS, 300), train_tokenizer(OTHER_CORPUS, 300)
    inv_t = {i: s for s, i in teacher.get_vocab().items()}
    inv_s = {i: s for s, i in student.get_vocab().items()}
    first = min(i for i in set(inv_t) | set(inv_s) if inv_t.get(i) != inv_s.get(i))
    with pytest.raises(VocabMismatchError) as error:
        check_vocab_compatible(teacher, student)
    message = str(error.value)
    assert f"differ at id {first}:" in message
    assert repr(inv_t[first]) in message and repr(inv_s[first]) in message
    assert f"teacher {len(teacher)} tokens, student {len(student)}" in message


def test_extra_student_tokens_after_the_teachers_last_id_are_refused_unless_allowed():
    teacher, student = train_tokenizer(CORPUS, 300), train_tokenizer(CORPUS, 300)
    check_vocab_compatible(teacher, student)
    student.add_special_tokens({"additional_special_tokens": ["<|SPEECH_PLACEHOLDER|>"]})
    assert real_vocab_size(student) == real_vocab_size(teacher) + 1
    with pytest.raises(VocabMismatchError, match="after the teacher's last id.*SPEECH_PLACEHOLDER"):
        check_vocab_compatible(teacher, student)
    check_vocab_compatible(teacher, student, allow_extra_student_tokens=True)
    with pytest.raises(VocabMismatchError, match="student <no token>"):  # the teacher may never have more
        check_vocab_compatible(student, teacher, allow_extra_student_tokens=True)


def test_a_different_special_token_at_the_same_id_is_refused():
    teacher, student = train_tokenizer(CORPUS, 300), train_tokenizer(CORPUS, 300)
    teacher.add_special_tokens({"additional_special_tokens": ["<|tool_call|>"]})
    student.add_special_tokens({"additional_special_tokens": ["<|AUDIO_OUT|>"]})
    expected = r"differ at id \d+: teacher '<\|tool_call\|>', student '<\|AUDIO_OUT\|>'"
    with pytest.raises(VocabMismatchError, match=expected):
        check_vocab_compatible(teacher, student)


def test_padded_lm_head_rows_are_cut_and_the_kd_loss_is_then_unchanged(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, text_dir = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    vocab = real_vocab_size(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(text_dir).eval()
    padded = AutoModelForCausalLM.from_pretrained(text_dir).eval()
    padded.resize_token_embeddings(vocab + 48)  # as checkpoints pad the lm_head to a multiple of 64
    with torch.no_grad():
        padded.lm_head.weight[vocab:] = padded.lm_head.weight[:vocab].mean(0) * 50  # rows that take softmax mass
    ids = torch.tensor([tokenizer("Which of these animals is a mammal? A. shark B. whale")["input_ids"]])
    with torch.no_grad():
        logits, logits_padded = model(input_ids=ids).logits, padded(input_ids=ids).logits
    assert logits_padded.shape[-1] == vocab + 48
    cut = cut_padded_vocab(logits_padded, vocab)
    torch.testing.assert_close(cut, logits)
    assert cut.data_ptr() == logits_padded.data_ptr()  # a view, no copy
    mask = torch.ones(ids.shape, dtype=torch.bool)
    student = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    student_padded = torch.cat([student, torch.full((*student.shape[:2], 48), 30.0)], -1)
    reference = kd_loss(student, logits, mask)
    teacher_cut, student_cut = align_logits(logits_padded, student_padded, vocab)
    torch.testing.assert_close(kd_loss(student_cut, teacher_cut, mask), reference)
    # Without the cut the padding rows change the distributions (the failure this guards against).
    assert not torch.isclose(kd_loss(student_padded, logits_padded, mask), reference, rtol=1e-2)


def test_cut_refuses_fewer_logits_than_the_vocabulary_and_fits_qwen_sizes():
    logits = torch.zeros(1, 2, 152_064)
    assert cut_padded_vocab(logits, 151_665).shape == (1, 2, 151_665)
    with pytest.raises(ValueError, match="fewer than the vocabulary"):
        cut_padded_vocab(logits, 152_065)
