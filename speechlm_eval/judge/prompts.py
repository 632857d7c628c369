"""VoiceBench's GPT-judge messages (upstream ``api_judge.py``) byte for byte, and how an item fills them.

Each line is written out with ``\\n`` and ``\\u2019`` escapes: that makes the curly apostrophes (U+2019) of the open
prompt and the trailing space in the qa prompt visible, and keeps an editor from changing them without anyone noticing.
"""

from __future__ import annotations

import hashlib
from typing import Any

PROMPT_SOURCE = (
    "MatthewCYM/VoiceBench api_judge.py at 533815410e3f4d602bd15a1de7105aea4acd828c "
    "(meta_prompt_open lines 11-28, meta_prompt_qa lines 30-42)"
)

# The system message sent with every judge call. It has a straight apostrophe, unlike the open prompt.
JUDGE_SYSTEM = "You are a helpful assistant who tries to help answer the user's question."

# meta_prompt_open: used as is, NOT stripped. It starts and ends with a newline and is 1,480 characters long.
OPEN_PROMPT = (
    "\n"
    "I need your help to evaluate the performance of several models in the speech interaction scenario. The models "
    "will receive a speech input from the user, which they need to understand and respond to with a speech output.\n"
    "Your task is to rate the model\u2019s responses based on the provided user input transcription [Instruction] and "
    "the model\u2019s output transcription [Response].\n"
    "\n"
    "Please evaluate the response on a scale of 1 to 5:\n"
    "1 point: The response is largely irrelevant, incorrect, or fails to address the user\u2019s query. It may be "
    "off-topic or provide incorrect information.\n"
    "2 points: The response is somewhat relevant but lacks accuracy or completeness. It may only partially answer the "
    "user\u2019s question or include extraneous information.\n"
    "3 points: The response is relevant and mostly accurate, but it may lack conciseness or include unnecessary "
    "details that don\u2019t contribute to the main point.\n"
    "4 points: The response is relevant, accurate, and concise, providing a clear answer to the user\u2019s question "
    "without unnecessary elaboration.\n"
    "5 points: The response is exceptionally relevant, accurate, and to the point. It directly addresses the "
    "user\u2019s query in a highly effective and efficient manner, providing exactly the information needed.\n"
    "\n"
    "Below are the transcription of user\u2019s instruction and models\u2019 response:\n"
    "### [Instruction]: {prompt}\n"
    "### [Response]: {response}\n"
    "\n"
    "After evaluating, please output the score only without anything else.\n"
    "You don\u2019t need to provide any explanations.\n"
)

# meta_prompt_qa as written upstream (between the triple quotes); upstream applies .strip(), so QA_PROMPT is stripped.
# Note the space before the newline after "reference answer?".
_QA_PROMPT_AS_WRITTEN = (
    "\n"
    "### Question\n"
    "{prompt}\n"
    "\n"
    "### Reference answer\n"
    "{reference}\n"
    "\n"
    "### Candidate answer\n"
    "{response}\n"
    "\n"
    "Is the candidate answer correct based on the question and reference answer? \n"
    'Please only output a single "Yes" or "No". Do not output anything else.\n'
)
QA_PROMPT = _QA_PROMPT_AS_WRITTEN.strip()


def fill_open_prompt(prompt: str, response: str) -> str:
    """The open prompt for one item. Upstream fills it with chained ``str.replace`` calls in this order, so a
    ``{response}`` inside the user's prompt is replaced too; that quirk is kept."""
    return OPEN_PROMPT.replace("{prompt}", prompt).replace("{response}", response)


def fill_qa_prompt(prompt: str, reference: str, response: str) -> str:
    """The qa prompt for one item, filled by chained ``str.replace`` calls: prompt, then reference, then response."""
    return QA_PROMPT.replace("{prompt}", prompt).replace("{reference}", reference).replace("{response}", response)


def judge_prompt(item: Any, response: str) -> str:
    """The user message the judge sees for ``response`` to ``item``.

    As upstream does, it uses the qa prompt when the item has a reference and the open prompt otherwise. The item's
    text (VoiceBench's ``prompt`` column) fills ``{prompt}``, in both the text and the speech arms.
    """
    if item.text is None:
        raise ValueError(f"{item.id}: the judge needs the item's text (VoiceBench `prompt`), which is missing")
    if item.reference is not None:
        return fill_qa_prompt(item.text, str(item.reference), response)
    return fill_open_prompt(item.text, response)


def prompt_digests() -> dict[str, str]:
    """sha256 of the system message and of both templates (before filling), for the manifest."""
    texts = {"system": JUDGE_SYSTEM, "open": OPEN_PROMPT, "qa": QA_PROMPT}
    return {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in texts.items()}
