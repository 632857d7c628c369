"""Teacher/student vocabulary checks and the cut of padded lm_head rows: KD compares logits id by id.

Two failures this guards against: a teacher whose tokenizer maps strings to different ids than the student's (the KL
would compare unrelated tokens), and lm_heads padded past the real vocabulary (Qwen2.5: 152,064 rows for 151,665
tokens; Qwen2-Audio: 156,032), whose extra rows carry untrained logits that take softmax mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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
    if len(inverse) != len(vocab) or len(inverse) < real_vocab_size(tokenizer):
        raise VocabMismatchError(f"{type(tokenizer).__name__} maps several strings to one id; cannot compare")
    return inverse


# A token compared by what it stands for: ("special", its name) for control and added tokens, ("bytes", the bytes it
# decodes to) for the rest. Needed where a tokenizer's strings are not one per id: Mistral's tekken (mistral-common)
# names every byte token that is not valid UTF-8 on its own "\ufffd".
TokenKey = tuple[str, "str | bytes"]


def token_keys(tokenizer: Any) -> dict[int, TokenKey]:
    """``{id: key}`` for every id of the tokenizer: mistral-common's tekken (its byte pieces and special names), or a
    transformers tokenizer (added tokens by name; the rest as bytes, through the byte-level alphabet when its decoder
    is byte-level, else sentencepiece's ``▁`` and ``<0xNN>`` conventions)."""
    tekken = _tekkenizer(tokenizer)
    if tekken is not None:
        return {i: ("special", tekken.id_to_piece(i)) if tekken.is_special(i) else
                ("bytes", tekken.id_to_byte_piece(i, "keep")) for i in range(tekken.n_words)}
    added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    byte_level = _is_byte_level(tokenizer)
    alphabet = {c: b for b, c in _bytes_to_unicode().items()}
    keys: dict[int, TokenKey] = {}
    for token, i in tokenizer.get_vocab().items():
        if i in added:
            keys[i] = ("special", added[i])
        elif byte_level:
            keys[i] = ("bytes", bytes(alphabet[c] for c in token) if all(c in alphabet for c in token)
                       else token.encode("utf-8"))
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            keys[i] = ("bytes", bytes([int(token[3:5], 16)]))
        else:
            keys[i] = ("bytes", token.replace("\u2581", " ").encode("utf-8"))
    return keys


def _tekkenizer(tokenizer: Any) -> Any:
    inner = getattr(getattr(getattr(tokenizer, "tokenizer", None), "instruct_tokenizer", None), "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "id_to_byte_piece") else None


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


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


@dataclass(frozen=True)
class KDSupport:
    """The token ids KD compares, in the teacher's and the student's id spaces, aligned by token string.

    When the two tokenizers agree id for id on the teacher's vocabulary (the organism; a speech LLM that only appends
    audio tokens after the teacher's ids) the support is the first ``size`` ids of both and no index is needed
    (``teacher_ids``/``student_ids`` None). Otherwise (released pairs such as Qwen2.5-Omni vs Qwen2.5-Instruct, where
    ids 151646-151648 are audio tokens in one and other specials in the other) the support is every token string both
    have, the rest is masked out of the KD loss on both sides, and each side's distribution is renormalised over the
    support (the teacher's top-k and the student's log-softmax are both taken over it).
    """

    size: int
    teacher_ids: Tensor | None = None
    student_ids: Tensor | None = None
    masked_teacher: tuple[str, ...] = ()
    masked_student: tuple[str, ...] = ()
    key: str = "string"  # what tokens were matched by: "string", or "bytes" (special names and byte pieces)

    @property
    def is_prefix(self) -> bool:
        return self.teacher_ids is None

    def teacher_logits(self, logits: Tensor) -> Tensor:
        """``(..., V_teacher)`` → ``(..., size)``: the teacher's logits over the support."""
        return cut_padded_vocab(logits, self.size) if self.is_prefix else logits[..., self.teacher_ids.to(logits.device)]

    def student_logits(self, logits: Tensor) -> Tensor:
        """``(..., V_student)`` → ``(..., size)``: the student's logits over the support, in the teacher's order."""
        return cut_padded_vocab(logits, self.size) if self.is_prefix else logits[..., self.student_ids.to(logits.device)]

    def support_targets(self, student_targets: Tensor) -> Tensor:
        """Student target ids ``(B, T)`` as positions in the support (for cross-entropy over it); ids outside it
        (never the case for targets the data step kept) map to 0, masked by the caller's response mask anyway."""
        if self.is_prefix:
            return student_targets
        lookup = torch.zeros(int(self.student_ids.max()) + 1, dtype=torch.long, device=student_targets.device)
        lookup[self.student_ids.to(student_targets.device)] = torch.arange(self.size, device=student_targets.device)
        return lookup[student_targets.clamp(max=lookup.numel() - 1)]

    def teacher_targets(self, student_target_ids: list[int], student_tokenizer: Any, teacher_tokenizer: Any
                        ) -> list[int] | None:
        """The student's target ids in the teacher's id space (``None`` when one is outside the support)."""
        if self.is_prefix:
            return list(student_target_ids) if all(i < self.size for i in student_target_ids) else None
        to_teacher = dict(zip(self.student_ids.tolist(), self.teacher_ids.tolist()))
        ids = [to_teacher.get(int(i)) for i in student_target_ids]
        return None if any(i is None for i in ids) else ids  # type: ignore[return-value]

    def describe(self, shown: int = 10) -> dict[str, Any]:
        """For the manifest: the support's size and how many (and which) tokens each side has outside it."""
        return {"size": self.size, "aligned": "id prefix" if self.is_prefix else f"by token {self.key}",
                "masked_teacher": len(self.masked_teacher), "masked_student": len(self.masked_student),
                "masked_teacher_tokens": list(self.masked_teacher[:shown]),
                "masked_student_tokens": list(self.masked_student[:shown])}


def kd_support(teacher_tokenizer: Any, student_tokenizer: Any) -> KDSupport:
    """The ids KD compares: the teacher's whole vocabulary when the student agrees with it id for id (extra student
    tokens after it allowed), else every token string both tokenizers have. Where a tokenizer's strings are not one
    per id (Mistral's tekken), tokens are compared by :func:`token_keys` (special name or bytes) on both sides."""
    key = "string"
    try:
        teacher, student = _id_to_token(teacher_tokenizer), _id_to_token(student_tokenizer)
    except VocabMismatchError:
        teacher, student = token_keys(teacher_tokenizer), token_keys(student_tokenizer)  # type: ignore[assignment]
        key = "bytes"
    size = real_vocab_size(teacher_tokenizer)
    if all(student.get(i) == t for i, t in teacher.items()):
        extra = tuple(_shown_key(t) for i, t in sorted(student.items()) if i not in teacher)
        return KDSupport(size=size, masked_student=extra)
    student_vocab = {t: i for i, t in student.items()}
    pairs = [(i, student_vocab[t]) for i, t in sorted(teacher.items()) if t in student_vocab]
    if not pairs:
        raise VocabMismatchError("teacher and student tokenizers share no token: KD is impossible")
    kept_teacher = {i for i, _ in pairs}
    kept_student = {j for _, j in pairs}
    return KDSupport(
        size=len(pairs),
        teacher_ids=torch.tensor([i for i, _ in pairs], dtype=torch.long),
        student_ids=torch.tensor([j for _, j in pairs], dtype=torch.long),
        key=key,
        masked_teacher=tuple(_shown_key(t) for i, t in sorted(teacher.items()) if i not in kept_teacher),
        masked_student=tuple(_shown_key(t) for i, t in sorted(student.items()) if i not in kept_student),
    )


def _shown_key(token: Any) -> str:
    return token if isinstance(token, str) else str(token[1]) if token[0] == "special" else repr(token[1])
