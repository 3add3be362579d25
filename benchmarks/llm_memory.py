"""Peak memory of one DP-SGD step of a Llama-shaped causal LM: does a 1B model fit a 16 GB edge GPU?

    python benchmarks/llm_memory.py                    # 1B Llama shape (Llama-3.2-1B), on CUDA when available
    python benchmarks/llm_memory.py --layers 2 --length 128 --batch 4 --physical 2   # a quick CPU check

The model is built from a config (random weights: memory does not depend on their values) in ``--dtype``
(bfloat16 by default) with rank-16 adapters (PiSSA, FedSVD client mode: B trains) on all seven projections, float32
adapter tensors. One DP step of a logical batch of ``--batch`` records × ``--length`` tokens (every token a response
token) runs through fedspec's own training loop (`train_steps`: Opacus, Poisson sampling off by batch = all records,
`BatchMemoryManager` micro-batches of ``--physical`` records). Reported: peak memory allocated by torch on the GPU
(`torch.cuda.max_memory_allocated`) or, on a CPU, the same figure from torch's profiler (the model's tensors plus the
step's peak allocation; the step time then includes the profiler) and the peak resident set of the process.
Target (issue: edge GPUs): ≤ 12 GB for the 1B shape, rank 16, batch 16 × 512.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch

import fedspec
from fedspec.causal_lm import CausalLM
from fedspec.models import Tokenized
from fedspec.training import DPSettings, train_steps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_1b(layers: int, dtype: torch.dtype, device: str) -> CausalLM:
    """Llama-3.2-1B's shape (hidden 2048, MLP 8192, 32 heads, 8 KV heads, vocabulary 128,256, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    with torch.device(device):
        lm = LlamaForCausalLM(config).to(dtype)
    return CausalLM(lm.requires_grad_(False).train())


def resident_gib() -> float:
    """The process's resident set now (Linux), GiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def tensor_gib(model: torch.nn.Module) -> float:
    """What the model's parameters and buffers hold, GiB."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def peak_allocated_gib(profiler) -> float:
    """The most memory torch's CPU allocator held at once while ``profiler`` ran (its ``[memory]`` events count
    from zero at the start), GiB: the CPU's counterpart of ``torch.cuda.max_memory_allocated`` for the step."""
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        profiler.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder blocks (16: the 1B shape)")
    parser.add_argument("--batch", type=int, default=16, help="logical (DP) batch, records")
    parser.add_argument("--length", type=int, default=512, help="tokens per record")
    parser.add_argument("--physical", type=int, default=4, help="records per forward/backward (BatchMemoryManager)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--mode", default="hooks", choices=["hooks", "ghost"], help="privacy.grad_sample_mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    warnings.simplefilter("ignore")
    model = llama_1b(args.layers, getattr(torch, args.dtype), args.device)
    fedspec.adapt(model, "pissa", args.rank, TARGETS, train_A=False)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128256, (args.batch, args.length), generator=generator).to(args.device)
    data = Tokenized(ids, torch.ones_like(ids))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before_step = resident_gib()
    on_cpu = args.device == "cpu"
    profiled = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    started = time.perf_counter()
    with profiled if on_cpu else nullcontext():
        # Sampling rate 1 (batch = all records) makes the Poisson batch the whole logical batch, every step.
        result = train_steps(model, data, ids.clone(), steps=1, batch_size=args.batch, optimizer="sgd", lr=0.1,
                             dp=DPSettings(1.0, 1.0, grad_sample_mode=args.mode, seed=0),
                             physical_batch_size=args.physical)
    seconds = time.perf_counter() - started
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        # What a GPU would have to hold: the model's tensors plus the most the step allocated on top of them. The
        # resident set is an upper bound: it also holds Python, torch's libraries and freed-but-cached pages.
        model_gib, step_gib = tensor_gib(model), peak_allocated_gib(profiled)
        peak = (f"peak memory allocated by torch {model_gib + step_gib:.2f} GiB (model {model_gib:.2f} + step "
                f"{step_gib:.2f}); peak resident memory of the process "
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB ({before_step:.2f} before the "
                "step)")
    print(f"Llama-1B-shaped, {args.layers} layers, {params / 1e9:.2f}B parameters in {args.dtype}, rank {args.rank} on "
          f"all projections ({trainable / 1e6:.1f}M float32 trainable), DP step ({args.mode}) of {result.examples} "
          f"records × {args.length} tokens in micro-batches of {args.physical} on {args.device}: {peak}; "
          f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
