"""The hierarchical prefill search at one size, for compute-sanitizer: does any variant of its kernels read or
write out of bounds? (On the H100 the search faulted at 128K, 32 / 8 heads, while its length arguments were
`do_not_specialize`; with them specialised, as shipped, it runs. Whether the shipped kernel touches memory it
should not, silently, only a memory checker says.)

    compute-sanitizer --tool memcheck python3 bench/probes/hier_fault.py --seqlen 131072 --top-k 32
    compute-sanitizer --tool memcheck python3 bench/probes/hier_fault.py --seqlen 131072 --unspecialised

--unspecialised: the two kernels with their length arguments unspecialised again (the faulting variant),
built from the module's source in this process. Prints the layout's density, or the error. Needs CUDA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402

from common import methods_inputs  # noqa: E402

_UNSPECIALISED = {
    "def _key_summary_kernel": '("S", "s_ob", "s_oh")',
    "def _prefill_search_kernel": '("sq", "sk", "nk", "s_kb", "s_kh", "s_ib", "s_ih", "s_in", "s_cb", "s_ch")',
}


def unspecialised_module():
    """sparse_attn.estimators.hierarchical's functions with the two prefill kernels unspecialised (a copy of the
    module's namespace; the registry is left alone)."""
    import sparse_attn.estimators.hierarchical as hier

    src = Path(hier.__file__).read_text().split("PATTERN = register_pattern")[0]
    for head, names in _UNSPECIALISED.items():
        old = f"@triton.jit\n{head}"
        if old not in src:
            raise SystemExit(f"{head}: not found as a plain @triton.jit kernel in {hier.__file__}")
        src = src.replace(old, f"@triton.jit(do_not_specialize={names})\n{head}")
    ns = {"__name__": "hier_unspecialised", "__package__": hier.__package__, "__file__": hier.__file__}
    exec(compile(src, hier.__file__, "exec"), ns)
    return ns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--unspecialised", action="store_true")
    a = p.parse_args(argv)
    if a.unspecialised:
        layout_fn = unspecialised_module()["hierarchical_layout"]
    else:
        from sparse_attn.estimators.hierarchical import hierarchical_layout as layout_fn
    q, k, _ = methods_inputs(a.seqlen)
    try:
        layout = layout_fn(q, k, a.top_k, block_size=64)
        torch.cuda.synchronize()
    except RuntimeError as e:
        print(f"seqlen {a.seqlen} top_k {a.top_k} unspecialised={a.unspecialised}: {e}")
        return 1
    print(f"seqlen {a.seqlen} top_k {a.top_k} unspecialised={a.unspecialised}: density {float(layout.density()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
