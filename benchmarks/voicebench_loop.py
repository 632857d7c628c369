"""An independent per-item answering loop, written the way VoiceBench's ``main.py`` drives Qwen2-Audio
(``src/models/qwen2.py``): one item at a time, in dataset order, ``processor.apply_chat_template`` on a one-turn
conversation, ``processor(text=..., audios=[clip])``, ``model.generate``, slice off the prompt, ``batch_decode``.

It imports nothing from speechlm_eval: it is the baseline ``bench_gap.py`` times against ``speechlm-eval gap``, each
side as a whole process. Differences from VoiceBench, all needed to compare the same work: the new-token budget is
``--max-new-tokens`` (VoiceBench passes ``max_length=2048``), decoding is greedy (``do_sample=False``; the tiny
checkpoints' own configs are greedy too), ``torch.set_num_threads(--threads)`` as gap is given, and the clips are read
from WAV files (VoiceBench decodes them from the HF dataset) listed in ``--items``, a JSONL of
``{"id", "text", "wav"}`` rows.

Run: ``python benchmarks/voicebench_loop.py --model DIR --items items.jsonl --modality audio|text --out answers.jsonl``
(``--limit 0``: start-up and model load only).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--items", required=True)
    parser.add_argument("--modality", choices=["audio", "text"], required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=None,
                        help="answer the first N items only; 0 = start-up and model load alone (bench_gap's floor)")
    args = parser.parse_args()

    import soundfile as sf
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.model, dtype="auto").eval()

    def generate(content: list[dict], audios: list | None) -> str:
        conversation = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if audios is None:
            inputs = processor(text=text, return_tensors="pt", padding=True)
        else:
            inputs = processor(text=text, audio=audios, return_tensors="pt", padding=True, sampling_rate=16000)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        ids = ids[:, inputs.input_ids.size(1):]
        return processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]

    with open(args.items, encoding="utf-8") as source, open(args.out, "w", encoding="utf-8") as sink:
        for number, line in enumerate(source):
            if args.limit is not None and number >= args.limit:
                break
            item = json.loads(line)
            if args.modality == "audio":
                clip, rate = sf.read(item["wav"], dtype="float32")
                assert rate == 16000
                response = generate([{"type": "audio", "audio_url": item["wav"]}], [clip])
            else:
                response = generate([{"type": "text", "text": item["text"]}], None)
            sink.write(json.dumps({"id": item["id"], "response": response}) + "\n")


if __name__ == "__main__":
    main()
