"""Specification of fundamentals.autograd: every op's gradient equals torch.autograd's.

Reference: torch.autograd on the same float64 inputs, upstream gradients and broadcasting
shapes; tolerance 1e-10, since both compute the same float64 formulas and differ only by
rounding order. Composite expressions are also checked against central finite differences
(step 1e-6, tolerance 1e-6: the truncation error of the difference quotient is O(h^2) and its
rounding error O(eps/h) ~ 1e-10).
"""

import pytest
import torch
import torch.nn.functional as F

from fundamentals.autograd import Tensor, cross_entropy, no_grad

TOL = dict(rtol=1e-10, atol=1e-10)

# (name, ours, torch's, input shapes, inputs kept positive): shapes chosen to broadcast in
# every way (new leading axes, size-1 axes on either side, Python scalars on either side).
OPS = [
    ("add", lambda a, b: a + b, lambda a, b: a + b, [(3, 1, 4), (2, 4)], False),
    ("sub", lambda a, b: a - b, lambda a, b: a - b, [(2, 4), (3, 1, 4)], False),
    ("mul", lambda a, b: a * b, lambda a, b: a * b, [(3, 1), (1, 5)], False),
    ("div", lambda a, b: a / b, lambda a, b: a / b, [(4,), (3, 4)], True),
    ("pow", lambda a, b: a**b, lambda a, b: a**b, [(3, 4), (4,)], True),
    ("scalar_add_left", lambda a: 2.5 + a, lambda a: 2.5 + a, [(3, 4)], False),
    ("scalar_sub_left", lambda a: 2.5 - a, lambda a: 2.5 - a, [(3, 4)], False),
    ("scalar_div_left", lambda a: 2.0 / a, lambda a: 2.0 / a, [(3, 4)], True),
    ("scalar_mul_right", lambda a: a * 3.0, lambda a: a * 3.0, [(3, 4)], False),
    ("pow_scalar", lambda a: a**3, lambda a: a**3, [(3, 4)], False),
    ("rpow_scalar", lambda a: 2.0**a, lambda a: 2.0**a, [(3, 4)], False),
    ("neg", lambda a: -a, lambda a: -a, [(3, 4)], False),
    ("matmul", lambda a, b: a @ b, lambda a, b: a @ b, [(3, 4), (4, 5)], False),
    ("matmul_batched", lambda a, b: a @ b, lambda a, b: a @ b, [(2, 1, 3, 4), (5, 4, 2)], False),
    ("matmul_vec_left", lambda a, b: a @ b, lambda a, b: a @ b, [(4,), (2, 4, 5)], False),
    ("matmul_vec_right", lambda a, b: a @ b, lambda a, b: a @ b, [(2, 3, 4), (4,)], False),
    ("exp", lambda a: a.exp(), torch.exp, [(3, 4)], False),
    ("log", lambda a: a.log(), torch.log, [(3, 4)], True),
    ("tanh", lambda a: a.tanh(), torch.tanh, [(3, 4)], False),
    ("relu", lambda a: a.relu(), torch.relu, [(3, 4)], False),
    ("sigmoid", lambda a: a.sigmoid(), torch.sigmoid, [(3, 4)], False),
    ("sum_all", lambda a: a.sum(), lambda a: a.sum(), [(2, 3, 4)], False),
    ("sum_axes", lambda a: a.sum(axis=(0, 2)), lambda a: a.sum(dim=(0, 2)), [(2, 3, 4)], False),
    ("sum_keepdims", lambda a: a.sum(1, keepdims=True), lambda a: a.sum(1, keepdim=True), [(2, 3, 4)], False),
    ("mean", lambda a: a.mean(-1), lambda a: a.mean(-1), [(2, 3, 4)], False),
    ("mean_keepdims", lambda a: a.mean(0, keepdims=True), lambda a: a.mean(0, keepdim=True), [(2, 3, 4)], False),
    ("max_all", lambda a: a.max(), lambda a: a.amax(), [(2, 3, 4)], False),
    ("max_axis", lambda a: a.max(1), lambda a: a.amax(1), [(2, 3, 4)], False),
    ("max_keepdims", lambda a: a.max(-1, keepdims=True), lambda a: a.amax(-1, keepdim=True), [(2, 3, 4)], False),
    ("softmax", lambda a: a.softmax(-1), lambda a: a.softmax(-1), [(2, 3, 4)], False),
    ("softmax_axis0", lambda a: a.softmax(0), lambda a: a.softmax(0), [(2, 3, 4)], False),
    ("log_softmax", lambda a: a.log_softmax(-1), lambda a: a.log_softmax(-1), [(2, 3, 4)], False),
    ("log_softmax_axis1", lambda a: a.log_softmax(1), lambda a: a.log_softmax(1), [(2, 3, 4)], False),
    ("reshape", lambda a: a.reshape(4, 6), lambda a: a.reshape(4, 6), [(2, 3, 4)], False),
    ("reshape_tuple", lambda a: a.reshape((-1,)), lambda a: a.reshape(-1), [(2, 3, 4)], False),
    ("transpose", lambda a: a.transpose(0, 2), lambda a: a.transpose(0, 2), [(2, 3, 4)], False),
    ("T", lambda a: a.T, lambda a: a.T, [(3, 4)], False),
    ("slice", lambda a: a[1:, ::2], lambda a: a[1:, ::2], [(3, 4)], False),
    ("int_array_repeats", lambda a: a[[0, 2, 0]], lambda a: a[[0, 2, 0]], [(3, 4)], False),
    ("int_arrays_pairs", lambda a: a[[0, 1, 1], [3, 0, 0]], lambda a: a[[0, 1, 1], [3, 0, 0]], [(3, 4)], False),
    ("mixed_index", lambda a: a[:, [2, 2, 1], 1:], lambda a: a[:, [2, 2, 1], 1:], [(2, 3, 4)], False),
]


def inputs(shapes, positive, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return [x.abs() + 0.5 if positive else x for x in xs]


@pytest.mark.parametrize("name, ours, theirs, shapes, positive", OPS, ids=[o[0] for o in OPS])
def test_op_value_and_gradient_equal_torch_autograd(name, ours, theirs, shapes, positive):
    xs = inputs(shapes, positive)
    mine = [Tensor(x, requires_grad=True) for x in xs]
    ref = [x.clone().requires_grad_(True) for x in xs]
    out, expected = ours(*mine), theirs(*ref)
    torch.testing.assert_close(out.data, expected.detach(), **TOL)
    # A random upstream gradient, so a backward that ignores it (or transposes it) cannot pass.
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for m, r in zip(mine, ref):
        assert m.grad.shape == m.shape  # broadcasting's copies were summed back to the input's shape
        torch.testing.assert_close(m.grad, r.grad, **TOL)


def test_cross_entropy_equals_torch():
    logits, = inputs([(6, 5)], False)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    mine, ref = Tensor(logits, requires_grad=True), logits.clone().requires_grad_(True)
    loss, expected = cross_entropy(mine, targets), F.cross_entropy(ref, targets)
    torch.testing.assert_close(loss.data, expected.detach(), **TOL)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(mine.grad, ref.grad, **TOL)


def finite_difference_grad(f, xs, i, h=1e-6):
    grad = torch.zeros_like(xs[i])
    for j in range(xs[i].numel()):
        plus = [x.clone() for x in xs]
        minus = [x.clone() for x in xs]
        plus[i].view(-1)[j] += h
        minus[i].view(-1)[j] -= h
        grad.view(-1)[j] = (f(*map(Tensor, plus)).item() - f(*map(Tensor, minus)).item()) / (2 * h)
    return grad


COMPOSITES = [
    ("mlp_cross_entropy", lambda x, w, b: cross_entropy((x @ w + b).tanh() * 2.0, [0, 2, 1]), [(3, 4), (4, 3), (3,)]),
    ("layernorm_like", lambda x, g: ((((x - x.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + 1e-5) ** -0.5
     * (x - x.mean(-1, keepdims=True)) * g).tanh().sum(), [(2, 5), (5,)]),
    ("reuse_and_gather", lambda x, y: ((x * x).sigmoid() / (1.0 + y.exp()))[[1, 1, 0]].max(0).log_softmax(-1)[2],
     [(2, 3), (3,)]),
]


@pytest.mark.parametrize("name, f, shapes", COMPOSITES, ids=[c[0] for c in COMPOSITES])
def test_composite_gradient_matches_finite_differences(name, f, shapes):
    xs = inputs(shapes, False, seed=3)
    leaves = [Tensor(x, requires_grad=True) for x in xs]
    f(*leaves).backward()
    for i, leaf in enumerate(leaves):
        torch.testing.assert_close(leaf.grad, finite_difference_grad(f, xs, i), rtol=1e-6, atol=1e-6)


def test_a_node_used_twice_gets_both_gradients_and_leaves_accumulate():
    x = Tensor([3.0], requires_grad=True)
    (x * x).sum().backward()  # d(x^2)/dx = 2x: both uses of x contribute
    assert x.grad.tolist() == [6.0]
    (x * 2.0).sum().backward()  # a second backward adds, as torch does, until zero_grad()
    assert x.grad.tolist() == [8.0]
    x.zero_grad()
    assert x.grad is None


def test_no_grad_builds_no_graph():
    x = Tensor([1.0, 2.0], requires_grad=True)
    with no_grad():
        y = (x * 2.0).sum()
    assert not y.requires_grad and y._parents == ()


def test_shapes_that_do_not_broadcast_are_named_in_the_error():
    a, b = Tensor(torch.zeros(3, 4)), Tensor(torch.zeros(5,))
    with pytest.raises(ValueError, match=r"cannot broadcast shapes \(3, 4\) and \(5,\) for '\+'"):
        a + b
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(5,\) for '\*'"):
        a * b


def test_backward_on_a_non_scalar_without_a_gradient_says_how_to_fix_it():
    y = Tensor(torch.ones(2, 3), requires_grad=True) * 2.0
    with pytest.raises(ValueError, match=r"needs a scalar, but this Tensor has shape \(2, 3\).*\.sum\(\)"):
        y.backward()
    y.backward(torch.ones(2, 3))  # an explicit upstream gradient is fine


def test_matmul_with_mismatched_inner_sizes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot multiply shapes \(3, 4\) @ \(5, 2\)"):
        Tensor(torch.zeros(3, 4)) @ Tensor(torch.zeros(5, 2))
