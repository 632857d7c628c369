"""Teacher/student vocabulary checks and the cut of padded lm_head rows: KD compares logits id by id.

Two failures this guards against: a teacher whose tokenizer maps strings to different ids than the student's (the KL
would compare unrelated tokens), and lm_heads padded past the real vocabulary (Qwen2.5: 152,064 rows for 151,665
tokens; Qwen2-Audio: 156,032), whose extra rows carry untrained logits that take softmax mass.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers do not map the same strings to the same ids."""


def real_vocab_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can produce, added/special tokens included (``len(tokenizer)``)."""
    return len(tokenizer)


def check_vocab_compatible(
    teacher_tokenizer: Any, student_tokenizer: Any, *, allow_extra_student_tokens: bool = False
) -> None:
    """Raise :class:`VocabMismatchError` unless both tokenizers map the same strings to the same ids.

    Compares the full ``get_vocab()`` maps (added and special tokens included) id by id and names the first id that
    differs and both sizes. With ``allow_extra_student_tokens`` the student may also have tokens *after* the
    teacher's last id (e.g. a speech LLM's ``<|AUDIO|>`` placeholders): distil over the teacher's ids only
    (``vocab_size = real_vocab_size(teacher_tokenizer)``).
    """
    teacher = _id_to_token(teacher_tokenizer)
    student = _id_to_token(student_tokenizer)
    n_teacher, n_student = real_vocab_size(teacher_tokenizer), real_vocab_size(student_tokenizer)
    sizes = f"teacher {n_teacher} tokens, student {n_student}"
    for token_id in sorted(set(teacher) | set(student)):
        ours, theirs = teacher.get(token_id), student.get(token_id)
        if ours == theirs:
            continue
        if ours is None and token_id > max(teacher, default=-1):
            if allow_extra_student_tokens:
                return
            n_extra = sum(1 for i in student if i > max(teacher, default=-1))
            raise VocabMismatchError(
                f"the student has {n_extra} token(s) after the teacher's last id (first: id {token_id} = "
                f"{theirs!r}; {sizes}); if these are modality placeholders never predicted in responses, pass "
                "allow_extra_student_tokens=True to distil over the teacher's ids"
            )
        raise VocabMismatchError(
            f"teacher and student tokenizers differ at id {token_id}: teacher {_show(ours)}, student "
            f"{_show(theirs)} ({sizes}); KD needs the same tokenizer (the teacher should be the student's own "
            "text backbone or share its tokenizer)"
        )


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    vocab = tokenizer.get_vocab()
    inverse = {token_id: token for token, token_id in vocab.items()}
    if len(inverse) != len(vocab):
        raise VocabMismatchError(f"{type(tokenizer).__name__} maps several strings to one id; cannot compare")
    return inverse


def _show(token: str | None) -> str:
    return "<no token>" if token is None else repr(token)


def cut_padded_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """``(B, T, V_padded)`` → ``(B, T, vocab_size)`` view without the lm_head's padding rows (no copy)."""
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} entries per token, fewer than the vocabulary ({vocab_size})")
    return logits[..., :vocab_size]


def align_logits(teacher_logits: Tensor, student_logits: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Cut both to the shared real vocabulary: ``(B, T, V_t)``, ``(B, T, V_s)`` → two ``(B, T, vocab_size)`` views."""
    return cut_padded_vocab(teacher_logits, vocab_size), cut_padded_vocab(student_logits, vocab_size)
