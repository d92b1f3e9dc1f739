"""PAPO token-stats op: naive vs chunked torch vs fused Triton kernel; time, peak memory, bandwidth floor.

    python benchmarks/bench_papo_op.py                       # T=4096, V=152064, tp=1, bf16, CPU
    python benchmarks/bench_papo_op.py --T 512 --V 32768     # quick
    python benchmarks/bench_papo_op.py --tp 2                # gloo ranks via run_distributed
    python benchmarks/bench_papo_op.py --device cuda --T 4096,16384 --V-local 38016,76032,152064
                                                             # GPU grid of the issue (one shard each)
    python benchmarks/bench_papo_op.py --H 2048 --variants naive,torch,linear
                                                             # from hidden states, matmuls included

Variants (all compute log p(y), log q(y), KL(p||q), H(p), H(q) and backpropagate into both logit
tensors with a loss that uses all five):
  naive:  all-gather the TP shards into [T, V], upcast to fp32, log_softmax, autograd backward
          (megatron_papo.ops.reference.naive_papo_token_stats);
  torch:  megatron_papo.ops.papo_token_stats(impl="torch") (token-chunked torch ops, hand-written
          backward; called "fused" in earlier tables, and --variants fused still selects it);
  triton: megatron_papo.ops.papo_token_stats(impl="triton") (one Triton kernel per pass; CUDA only,
          skipped on CPU).

From hidden states (``--H`` > 0): the inputs are the output layer's inputs of both branches
[T, H] and the output weight [V_local, H]; naive / torch / triton first form the logits
``h @ W.T`` (their matmuls and the logits' memory count), and
  linear: megatron_papo.ops.linear_papo_token_stats (tiles; the logits never exist).
Every variant backpropagates into both hidden tensors and the weight. "working MB" = peak extra
minus the gradients every variant must return ([T, H] twice and [V_local, H]), i.e. the op's own
memory. The bandwidth floor columns are left empty (the matmuls dominate).

Bandwidth floor. The least traffic any implementation needs: read both [T, V_local] logit tensors
once in the forward and once in the backward, and write both gradients once, i.e.
6 * T * V_local * element_size bytes. Divided by a measured copy bandwidth (a large
device-to-device tensor copy timed with cuda events on GPU, a memcpy of a 256 MiB tensor on CPU;
bytes read + written per second, best of 5) it gives "floor ms"; "floor/measured" = floor ms /
fwd+bwd ms (1.0 = at the memory-bandwidth floor).

Memory. CPU: every variant runs in a fresh process (a subprocess, or fresh gloo ranks for
--tp > 1). After the inputs are built, the kernel's peak-RSS mark (VmHWM) is reset by writing 5
to /proc/self/clear_refs, and "peak extra" = VmHWM - VmRSS(before), i.e. the highest resident
memory above the inputs reached during forward + backward (it includes the [T, V_local]
gradients, which every variant must return, and the autograd graph). The children run with
MALLOC_MMAP_THRESHOLD_=65536 so glibc returns every freed block above 64 KiB to the OS and RSS
follows live tensors; a warm-up call on 8 tokens first pages in the kernels' code. With
--tp > 1 the numbers are the maximum over ranks. Times come from a second fresh run with
glibc's default malloc (the fixed threshold adds page-fault cost to every chunk buffer).
CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step.
Time: wall clock (CPU) or cuda events (GPU), best of --repeats (after one warm-up on GPU).
A naive CPU run estimated not to fit in the available RAM is skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

SEP = "BENCH_RESULT "


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _inputs(t: int, v_local: int, vocab_size: int, dtype: torch.dtype, device: str, rank: int, h: int = 0):
    """This rank's inputs (seeded by rank): logit shards, or with ``h`` > 0 hidden states [t, h]
    of both branches and the weight shard [v_local, h] (logits of std ~3); and targets / loss
    weights shared by all ranks."""
    gen = torch.Generator(device=device).manual_seed(rank)
    if h > 0:
        hid = torch.randn(t, h, generator=gen, dtype=dtype, device=device)
        hidq = torch.randn(t, h, generator=gen, dtype=dtype, device=device)
        wt = torch.randn(v_local, h, generator=gen, dtype=dtype, device=device).mul_(3 / h**0.5)
        leaves = (hid.requires_grad_(), hidq.requires_grad_(), wt.requires_grad_())
    else:
        z = torch.randn(t, v_local, generator=gen, dtype=dtype, device=device).mul_(3)
        zq = torch.randn(t, v_local, generator=gen, dtype=dtype, device=device).mul_(3)
        leaves = (z.requires_grad_(), zq.requires_grad_())
    gen.manual_seed(12345)
    y = torch.randint(0, vocab_size, (t,), generator=gen, device=device)
    w = torch.randn(5, t, generator=gen, device=device)
    return leaves, y, w


def _step(variant: str, leaves, y, group, vocab_size: int, chunk_size: int | None):
    from megatron_papo.ops import linear_papo_token_stats, papo_token_stats
    from megatron_papo.ops.reference import naive_papo_token_stats

    if variant == "linear":
        return linear_papo_token_stats(*leaves, y, group, vocab_size, chunk_size=chunk_size)
    z, zq = leaves if len(leaves) == 2 else (leaves[0] @ leaves[2].T, leaves[1] @ leaves[2].T)
    if variant in ("torch", "triton"):
        return papo_token_stats(z, zq, y, group, vocab_size, chunk_size=chunk_size, impl=variant)
    return naive_papo_token_stats(z, zq, y, group, vocab_size)


def _loss(s, w):
    stats = (s.log_probs, s.masked_log_probs, s.kl, s.entropy, s.masked_entropy)
    return sum((x * w[i]).sum() for i, x in enumerate(stats))


def measure(variant: str, t: int, v_local: int, dtype: torch.dtype, device: str, repeats: int,
            group: dist.ProcessGroup | None, rank: int, vocab_size: int, chunk_size: int | None,
            h: int = 0) -> dict:
    """Time forward and forward+backward; peak extra memory over the inputs. One process, one variant."""
    # warm-up on a few tokens first: the first call of each kernel pages in library code, which
    # would otherwise show up in the RSS peak
    leaves, y, w = _inputs(min(t, 8), v_local, vocab_size, dtype, device, rank, h)
    _loss(_step(variant, leaves, y, group, vocab_size, chunk_size), w).backward()
    leaves, y, w = _inputs(t, v_local, vocab_size, dtype, device, rank, h)
    returned = sum(x.numel() * x.element_size() for x in leaves)  # the gradients autograd returns
    cuda = device == "cuda"
    fwd_ms, total_ms, peak = [], [], 0
    runs = repeats + (1 if cuda else 0)
    for i in range(runs):
        for x in leaves:
            x.grad = None
        if group is not None:
            dist.barrier(group)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        else:
            _reset_peak_rss()
            base = _read_status_kb("VmRSS") * 1024
            t0 = time.perf_counter()
        s = _step(variant, leaves, y, group, vocab_size, chunk_size)
        loss = _loss(s, w)
        if cuda:
            ev[1].record()
        else:
            t1 = time.perf_counter()
        loss.backward()
        if cuda:
            ev[2].record()
            torch.cuda.synchronize()
            f, b = ev[0].elapsed_time(ev[1]), ev[0].elapsed_time(ev[2])
            extra = torch.cuda.max_memory_allocated() - base
        else:
            t2 = time.perf_counter()
            f, b = (t1 - t0) * 1e3, (t2 - t0) * 1e3
            extra = _read_status_kb("VmHWM") * 1024 - base
        del s, loss
        if cuda and i == 0:
            continue  # warm-up
        fwd_ms.append(f)
        total_ms.append(b)
        peak = max(peak, extra)
    return {"variant": variant, "T": t, "V_local": v_local, "dtype": str(dtype).replace("torch.", ""),
            "fwd_ms": min(fwd_ms), "fwd_bwd_ms": min(total_ms), "peak_extra_mb": peak / 2**20,
            "working_mb": (peak - returned) / 2**20}


def _rank_fn(rank: int, world: int, variant: str, t: int, v_local: int, dtype_name: str, repeats: int,
             chunk_size: int | None, h: int = 0) -> dict:
    group = dist.new_group(list(range(world)))
    return measure(variant, t, v_local, getattr(torch, dtype_name), "cpu", repeats, group, rank,
                   v_local * world, chunk_size, h)


def run_variant(args, variant: str, fixed_mmap: bool) -> dict:
    """One variant in fresh process(es); returns its measurements.

    fixed_mmap: run the children with MALLOC_MMAP_THRESHOLD_=65536 (memory phase, see the module
    docstring); the time phase uses glibc's default malloc, as a training process would.
    """
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if args.tp > 1:
        from megatron_papo.testing import run_distributed

        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)  # spawned ranks start fresh interpreters with this environment
        try:
            threads = max(1, (os.cpu_count() or 1) // args.tp)
            rank_args = (variant, args.T, args.V // args.tp, args.dtype, args.repeats, args.chunk_size,
                         args.H)
            res = run_distributed(_rank_fn, args.tp, rank_args, timeout=3000, threads_per_rank=threads)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        out = dict(res[0])
        for key in ("peak_extra_mb", "working_mb", "fwd_ms", "fwd_bwd_ms"):
            out[key] = max(r[key] for r in res)
        return out
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--T", str(args.T),
           "--V", str(args.V), "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats),
           "--H", str(args.H)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}; -9 = killed, e.g. out of memory):\n"
                           f"{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith(SEP))
    return json.loads(line[len(SEP):])


# The naive path's peak on CPU, measured at T=512, V=152064 bf16: ~46 bytes per [T, V] element
# (about 11.5 fp32 copies). Used to skip a run that cannot fit in RAM instead of swapping/OOM.
NAIVE_BYTES_PER_ELEMENT = 46


def _naive_fits(args) -> tuple[bool, str]:
    import psutil

    need = NAIVE_BYTES_PER_ELEMENT * args.T * args.V * args.tp  # every rank gathers the full V
    avail = psutil.virtual_memory().available
    why = f"needs ~{need / 2**30:.0f} GiB (estimated), {avail / 2**30:.0f} GiB available"
    return need < 0.85 * avail, why


def copy_bandwidth_gbs(device: str, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Measured copy bandwidth in GB/s (1e9 bytes): (bytes read + bytes written) / time of dst.copy_(src).

    CUDA: a device-to-device copy of ``nbytes`` timed with cuda events; CPU: a memcpy of
    min(nbytes, 256 MiB) timed with perf_counter. Best of ``repeats`` after one warm-up.
    """
    if device != "cuda":
        nbytes = min(nbytes, 256 * 2**20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up, pages in dst
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            torch.cuda.synchronize()
            ev[0].record()
            dst.copy_(src)
            ev[1].record()
            torch.cuda.synchronize()
            sec = ev[0].elapsed_time(ev[1]) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            sec = time.perf_counter() - t0
        best = min(best, sec)
    return 2 * nbytes / best / 1e9


def floor_bytes(t: int, v_local: int, dtype: torch.dtype) -> int:
    """Bytes that must move: both logit tensors read in forward and backward, both grads written."""
    return 6 * t * v_local * torch.empty((), dtype=dtype).element_size()


def floor_ms(t: int, v_local: int, dtype: torch.dtype, bandwidth_gbs: float) -> float:
    """floor_bytes / measured copy bandwidth, in milliseconds."""
    return floor_bytes(t, v_local, dtype) / (bandwidth_gbs * 1e9) * 1e3


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _row(args, variant: str, bandwidth: float) -> str:
    """Measure one variant at one grid point (args.T, args.V) and format its table row."""
    v_local = args.V // args.tp
    dtype = getattr(torch, args.dtype)
    floor = f"{floor_ms(args.T, v_local, dtype, bandwidth):.1f}" if not args.H else ""
    row = f"| {variant} | {args.tp} | {args.T} | {args.H or '-'} | {v_local} | {args.dtype} | "
    if variant == "triton" and args.device != "cuda":
        return row + f"skipped (GPU only) | | | | {floor} | |"
    if variant == "linear" and not args.H:
        return row + f"needs --H | | | | {floor} | |"
    if variant == "naive" and args.device == "cpu":
        fits, why = _naive_fits(args)
        if not fits:
            return row + f"skipped | skipped | {why} | | {floor} | |"
    if args.device == "cuda":
        r = run_variant(args, variant, fixed_mmap=False)
        peak, working = r.get("peak_extra_mb"), r.get("working_mb")
    else:
        mem = run_variant(args, variant, fixed_mmap=True)
        peak, working = mem.get("peak_extra_mb"), mem.get("working_mb")
        r = run_variant(args, variant, fixed_mmap=False)
    if "error" in r:
        return row + f"{r['error']} | {r['error']} | | | {floor} | |"
    ratio = f"{float(floor) / r['fwd_bwd_ms']:.3f}" if floor else ""
    return row + (f"{r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {peak:.0f} | {working:.0f} | {floor} "
                  f"| {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=_ints, default=[4096], help="tokens; a comma list runs a grid")
    p.add_argument("--V", type=int, default=152064, help="global (padded) vocabulary; V_local = V / tp")
    p.add_argument("--V-local", type=_ints, default=None, dest="v_local",
                   help="comma list of V_local values (overrides --V: V = V_local * tp)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--H", type=int, default=0,
                   help="hidden size: start from hidden states + output weight (0 = from logits)")
    p.add_argument("--variants", default=None,
                   help="comma list of naive, torch (alias fused), triton, linear (with --H); default "
                        "naive,torch on CPU, naive,torch,triton on CUDA")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda" and args.tp > 1:
        p.error("--device cuda supports --tp 1 only (launch under torchrun for more)")
    vs = [args.V] if args.v_local is None else [v * args.tp for v in args.v_local]
    if any(v % args.tp for v in vs):
        p.error(f"--V {args.V} must be divisible by --tp {args.tp}")

    if args.worker:  # inside the fresh subprocess of one variant
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            r = measure(args.worker, args.T[0], vs[0], getattr(torch, args.dtype), args.device, args.repeats,
                        None, 0, vs[0], args.chunk_size, args.H)
        except torch.OutOfMemoryError:
            r = {"error": "out of memory"}
        print(SEP + json.dumps(r), flush=True)
        return

    variants = args.variants or ("naive,torch,triton" if args.device == "cuda" else "naive,torch")
    variants = [{"fused": "torch"}.get(v, v) for v in variants.split(",")]
    bandwidth = copy_bandwidth_gbs(args.device)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, nproc {os.cpu_count()}, device {args.device} ({dev}), tp {args.tp}, "
          f"copy bandwidth {bandwidth:.1f} GB/s (read+write)")
    header = ("| variant | tp | T | H | V_local | dtype | fwd ms | fwd+bwd ms | peak extra MB | working MB "
              "| floor ms | floor/measured |")
    print(header + "\n|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for t in args.T:
        for v in vs:
            point = argparse.Namespace(**{**vars(args), "T": t, "V": v})
            for variant in variants:
                print(_row(point, variant, bandwidth), flush=True)


if __name__ == "__main__":
    main()
