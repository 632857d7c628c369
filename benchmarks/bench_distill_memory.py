"""Projected peak memory of one distillation micro-batch on a 7B student, from measurements on layer-reduced models of
real width and vocabulary (random weights, CPU), at ``speechlm-eval distill``'s defaults.

Run: ``.venv/bin/python benchmarks/bench_distill_memory.py [--tokens 600] [--response 256]``; prints one JSON object.
On a GPU: ``--device cuda`` measures the same cases in bfloat16 with ``torch.cuda.max_memory_allocated`` (no halving),
and ``--full-depth`` adds each model at its real layer count, default batch and length, measured whole: the peak
the projection stands for, printed beside it (a check of the projection; 7B weights do not fit this CPU machine).

What is measured, in a fresh subprocess per case (peak resident-set growth over the model and inputs: the peak is
reset to the current RSS after set-up, Linux ``clear_refs``), at the projection's own batch and length (by default;
``--measure-batch``/``--measure-tokens`` measure smaller and scale linearly, which overstates the head-and-loss part
that scales with the response positions), in float32 (CPU bfloat16 matmuls run ~50x slower here); activations are
halved for the bfloat16 projection:
one channel's forward + backward of the KD loss exactly as the training loop runs it (LoRA r=16 on q/k/v/o, the head
projecting only the response positions, the chunked KD loss against a cached top-k teacher), for the language model of
each 7B configuration with 1 and 2 decoder layers, with and without gradient checkpointing. The difference between the
2- and 1-layer peaks is what one more layer costs; divided by the tokens of the batch it is the per-token-per-layer
figure. The projection for the whole model:

    peak ≈ weights (all parameters, bf16) + layers × per-layer-per-token × batch × tokens + the 1-layer case's rest

at the defaults: batch 8, ``--tokens`` per sequence (default 600: a spoken question of ~10 s is ~250 audio tokens in
Qwen2-Audio/Omni, plus template and system turn, plus a 256-token response), one backward per channel (so one
channel's activations are alive), response positions only through the head. The audio encoder is frozen and runs
under ``no_grad`` (its weights count, its activations do not persist). "Before" = the previous recipe: both channels'
graphs alive until one backward (2× activations) and logits for every position.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3
BF16_OVER_FP32 = 0.5  # measured in float32, trained in bfloat16: activations take half the bytes
# Language-model sizes of the real checkpoints' config.json (text part), and the whole checkpoint's parameter count.
CONFIGS = {
    "Qwen2-Audio-7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                       "num_key_value_heads": 32, "vocab_size": 156032, "layers": 32, "parameters": 8.4e9},
    "Qwen2.5-Omni-7B (thinker)": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                                  "num_key_value_heads": 4, "vocab_size": 152064, "layers": 28, "parameters": 8.9e9},
}


def measure(name: str, layers: int, checkpointing: bool, batch: int, tokens: int, response: int,
            device: str = "cpu") -> dict:
    """One case in this process: peak memory growth (bytes) of forward + backward over the model and inputs (RSS
    on CPU, in float32; allocated GPU memory on cuda, in bfloat16), and on cuda the absolute peak, weights included."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from speechlm_eval.distill.losses import TopK, kd_loss
    from speechlm_eval.models.hf_runtime import head_on_last_positions

    torch.manual_seed(0)
    torch.set_num_threads(1)
    spec = CONFIGS[name]
    config = Qwen2Config(hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                         num_attention_heads=spec["num_attention_heads"],
                         num_key_value_heads=spec["num_key_value_heads"], vocab_size=spec["vocab_size"],
                         num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False)
    cuda = device.startswith("cuda")
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    if cuda:
        model = model.to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    with torch.device(device):
        input_ids = torch.randint(0, spec["vocab_size"], (batch, tokens))
        # A cached top-k teacher as the loop reads it (64 ids + rest + 64 tail samples per token): made directly.
        vocab, lead = spec["vocab_size"], (batch, response)
        logprobs = torch.randn(*lead, 64).sort(-1, descending=True).values - 3
        teacher = TopK(logprobs, torch.randint(0, vocab, (*lead, 64)), torch.full(lead, -2.0),
                       tail_indices=torch.randint(0, vocab, (*lead, 64)), tail_logprobs=torch.full((*lead, 64), -12.0),
                       tail_stats=torch.stack([torch.zeros(lead), torch.full(lead, -1.0)], -1), tail_temperature=2.0)
        mask = torch.ones(batch, response, dtype=torch.bool)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = start_peak_window()
    with head_on_last_positions(model, response + 1):
        logits = model(input_ids=input_ids, logits_to_keep=response + 1).logits[:, -(response + 1):-1]
    loss = kd_loss(logits, teacher, mask, temperature=2.0, topk_tail="sampled")
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"growth_bytes": peak - before, "peak_bytes": peak,
                "parameters": sum(p.numel() for p in model.parameters())}
    return {"growth_bytes": peak_rss() - before}


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def start_peak_window() -> int:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs`` 5) and return that RSS in bytes, so
    the peak read later is this window's own. ``ru_maxrss`` alone cannot be reset: it keeps the model set-up's peak
    (random initialisation's temporaries), which hides a forward+backward peak below it. Without ``clear_refs``
    (not Linux), the set-up's peak is the baseline."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """The process's peak RSS in bytes since :func:`start_peak_window` (``VmHWM``; else ``ru_maxrss``)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(*args: str, options: tuple[str, ...] = ()) -> dict:
    done = subprocess.run([sys.executable, __file__, *options, "--case", *args], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=600, help="tokens per sequence (prompt + response)")
    parser.add_argument("--response", type=int, default=256, help="response tokens (the positions the head sees)")
    parser.add_argument("--batch", type=int, default=8, help="the projection's micro-batch (distill --batch-size)")
    parser.add_argument("--measure-batch", type=int, default=None, help="batch of the measured cases (--batch)")
    parser.add_argument("--measure-tokens", type=int, default=None, help="their tokens per sequence (--tokens)")
    parser.add_argument("--jobs", type=int, default=1, help="cases measured at once (each its own process)")
    parser.add_argument("--device", default="cpu", help="cpu (float32, RSS) or cuda (bfloat16, allocated memory)")
    parser.add_argument("--full-depth", action="store_true",
                        help="also measure each model whole at the defaults (real layers; needs a GPU's memory)")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.measure_batch = args.measure_batch or args.batch
    args.measure_tokens = args.measure_tokens or args.tokens
    cuda = args.device.startswith("cuda")
    if args.full_depth and not cuda:
        parser.error("--full-depth builds 7B models: it needs --device cuda")
    if args.case:
        name, layers, checkpointing = args.case
        if int(layers) == CONFIGS[name]["layers"]:  # a whole model, at the projection's batch and length
            batch, tokens, response = args.batch, args.tokens, args.response
        else:
            batch, tokens = args.measure_batch, args.measure_tokens
            response = min(args.response, args.measure_tokens - 8)
        print(json.dumps(measure(name, int(layers), checkpointing == "1", batch, tokens, response, args.device)))
        return
    options = ("--device", args.device, "--batch", str(args.batch), "--tokens", str(args.tokens),
               "--response", str(args.response), "--measure-batch", str(args.measure_batch),
               "--measure-tokens", str(args.measure_tokens))
    scale = 1.0 if cuda else BF16_OVER_FP32
    report: dict = {"defaults": {"batch": args.batch, "tokens": args.tokens, "response": args.response,
                                 "dtype": "bfloat16 (measured in bfloat16 on the GPU)" if cuda else
                                          "bfloat16 (measured in float32, activations halved)",
                                 "lora": "r=16 on q/k/v/o"},
                    "measured_on": {"batch": args.measure_batch, "tokens": args.measure_tokens,
                                    "device": args.device}, "models": {}}
    measured_tokens = args.measure_batch * args.measure_tokens
    cases = [(name, str(layers), str(int(checkpointing))) for name in CONFIGS for checkpointing in (False, True)
             for layers in (1, 2)]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        growth = dict(zip(cases, pool.map(lambda case: run_case(*case, options=options)["growth_bytes"], cases)))
    for name, spec in CONFIGS.items():
        entry: dict = {"real_layers": spec["layers"], "parameters": spec["parameters"]}
        for checkpointing in (False, True):
            one, two = (growth[(name, layers, str(int(checkpointing)))] for layers in ("1", "2"))
            per_layer_token = max(0, two - one) / measured_tokens * scale
            # Embedding lookups, the head on the response positions, the chunked loss (bf16 as well, except the loss's
            # float32 chunks: kept at their measured size, an overestimate for the rest).
            rest = max(0, one - (two - one))
            tokens = args.batch * args.tokens
            weights = spec["parameters"] * 2
            activations = per_layer_token * spec["layers"] * tokens
            rest_scaled = rest * tokens / measured_tokens
            projected = weights + activations + rest_scaled
            # The previous recipe: both channels alive until one backward, logits at every position.
            full_logits = args.batch * args.tokens * spec["vocab_size"] * 4 * 2  # fp32 logits + their gradient
            before = weights + 2 * activations + rest_scaled + full_logits
            key = "checkpointing" if checkpointing else "no_checkpointing"
            entry[key] = {
                "measured_growth_1_layer_gib": round(one / GIB, 3), "measured_growth_2_layers_gib": round(two / GIB, 3),
                "per_layer_per_token_kib": round(per_layer_token / 1024, 1),
                "projected_peak_gib": round(projected / GIB, 1),
                "projected_peak_previous_recipe_gib": round(before / GIB, 1),
                "parts_gib": {"weights_bf16": round(weights / GIB, 1), "activations": round(activations / GIB, 1),
                              "rest": round(rest_scaled / GIB, 1)},
            }
            if args.full_depth:
                whole = run_case(name, str(spec["layers"]), str(int(checkpointing)), options=options)
                # The language model is built, not the audio encoder: its bf16 weights are added (frozen, no grad).
                measured = whole["peak_bytes"] + max(0, spec["parameters"] - whole["parameters"]) * 2
                entry[key]["measured_peak_full_depth_gib"] = round(measured / GIB, 1)
                entry[key]["measured_over_projected"] = round(measured / projected, 3)
        entry["target_gib"] = 40
        report["models"][name] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
