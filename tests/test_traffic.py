"""The traffic model: exact byte and FLOP counts on simple programs, views free, batch extrapolation exact."""

import pytest
import torch
from torch import nn

from siclip.analysis.traffic import OpTraffic, distinct_bytes, extrapolate, roofline_ms, trace_traffic


def test_elementwise_and_matmul_ops_are_counted_exactly(seed):
    n, k, m = 7, 5, 3
    a, b = torch.randn(n, k), torch.randn(n, k)
    w = torch.randn(m, k)
    ops = trace_traffic(lambda: (a + b) @ w.t())
    assert [o.op for o in ops] == ["add", "mm"]  # w.t() is a view: no bytes, not listed
    assert ops[0] == OpTraffic("add", 3 * n * k * 4, 0)
    assert ops[1] == OpTraffic("mm", (n * k + m * k + n * m) * 4, 2 * n * k * m)


def test_broadcast_inputs_count_their_distinct_elements(seed):
    row = torch.randn(1, 6)
    assert distinct_bytes(row.expand(100, 6)) == 6 * 4
    ops = trace_traffic(lambda: torch.randn(100, 6, dtype=torch.float64) * row.double())
    assert ops[-1].op == "mul" and ops[-1].bytes == (600 + 6 + 600) * 8


def test_extrapolation_from_two_batches_is_exact(seed):
    layer = nn.Linear(8, 16)

    def trace(batch: int):
        x = torch.randn(batch, 8, requires_grad=True)
        layer.zero_grad(set_to_none=True)  # no accumulation: the same ops at every batch
        return trace_traffic(lambda: layer(x).sum().backward())

    predicted = extrapolate(trace(2), trace(4), (10 - 2) / 2)
    assert predicted == trace(10)
    with pytest.raises(ValueError, match="different ops"):
        extrapolate(trace(2), trace(2)[:-1], 1.0)


def test_roofline_takes_the_slower_bound_per_op():
    ops = [OpTraffic("mm", bytes=10**9, flops=10**12), OpTraffic("add", bytes=3 * 10**9, flops=0)]
    # mm: max(1e12/1e14, 1e9/1e12) = 10 ms; add: 3 ms; two launches of 5 µs.
    assert roofline_ms(ops, tflops=100, tbytes_per_s=1, launch_us=5) == pytest.approx(13.01)


def test_destinations_are_written_not_read_and_allocation_is_free(seed):
    src, pre = torch.randn(4, 6), torch.randn(4, 6)
    buffer = torch.empty(4, 10)  # allocated outside the trace
    ops = trace_traffic(
        lambda: (
            buffer[:, :6].copy_(src),
            torch.ops.aten.gelu_backward.grad_input(src, pre, grad_input=buffer[:, 4:]),
            torch.empty(100, 100),
            buffer.add_(1.0),
        )
    )
    assert [o.op for o in ops] == ["copy_", "gelu_backward", "add_"]
    assert ops[0].bytes == 2 * 24 * 4  # src read, the slice written
    assert ops[1].bytes == 3 * 24 * 4  # two inputs read, a strided 4×6 destination written
    assert ops[2].bytes == 2 * 40 * 4  # in place: read and written
