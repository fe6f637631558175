"""Specification of fundamentals.cnn: im2col convolution and max pooling equal torch's.

Reference: F.conv2d and F.max_pool2d, values and gradients (input, weight, bias) through
torch.autograd, in float64; tolerance 1e-10 (the same sums in a different order).
"""

import io

import pyarrow as pa  # installed with datasets, a dependency of the zoo
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from fundamentals.cnn import BasicBlock, Conv2d, ResNet, SmallCNN, conv2d, max_pool2d
from fundamentals.cnn.cifar import load_cifar10

TOL = dict(rtol=1e-10, atol=1e-10)

CONVS = [  # (N, C, H, W), (O, C, kh, kw), stride, padding
    ((2, 3, 8, 8), (4, 3, 3, 3), 1, 1),
    ((1, 2, 9, 7), (5, 2, 3, 2), 2, 0),  # odd sizes, non-square kernel, stride 2
    ((3, 1, 6, 6), (2, 1, 1, 1), 1, 0),  # 1x1: a per-pixel linear map
    ((2, 4, 5, 5), (3, 4, 5, 5), 1, 2),  # kernel as large as the input
]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONVS)
def test_conv2d_equals_F_conv2d_in_value_and_gradient(x_shape, w_shape, stride, padding):
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s, generator=g, dtype=torch.float64) for s in (x_shape, w_shape, w_shape[:1])]
    mine = [t.clone().requires_grad_(True) for t in leaves]
    ref = [t.clone().requires_grad_(True) for t in leaves]
    out = conv2d(*mine, stride=stride, padding=padding)
    expected = F.conv2d(*ref, stride=stride, padding=padding)
    torch.testing.assert_close(out, expected, **TOL)
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for name, m, r in zip(("input", "weight", "bias"), mine, ref):
        torch.testing.assert_close(m.grad, r.grad, **TOL, msg=f"gradient of the {name}")


@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), (3, 2, 1), (3, 1, 0)])
def test_max_pool2d_equals_F_max_pool2d_in_value_and_gradient(kernel, stride, padding):
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mine, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, expected = max_pool2d(mine, kernel, stride, padding), F.max_pool2d(ref, kernel, stride, padding)
    torch.testing.assert_close(out, expected, **TOL)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, **TOL)  # random data has no ties, so both pick one maximum


def test_conv_input_with_the_wrong_number_of_channels_is_a_clear_error():
    conv = Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match=r"input has 32 channels .*\(2, 32, 32, 3\).* expects C=3.*permute\(0, 3, 1, 2\)"):
        conv(torch.zeros(2, 32, 32, 3))  # a channels-last batch
    with pytest.raises(ValueError, match=r"expects input of shape \(N, C, H, W\), got \(8, 8\)"):
        conv2d(torch.zeros(8, 8), torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"ResNet expects images of shape \(N, 1, H, W\), got \(4, 3, 8, 8\)"):
        ResNet()(torch.zeros(4, 3, 8, 8))


def test_models_map_digit_and_cifar_sized_images_to_class_logits():
    assert SmallCNN()(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert ResNet(widths=(8, 16, 32))(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert ResNet(widths=(8, 16, 32), in_channels=3)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_a_basic_block_with_zero_residual_branch_passes_its_input_through():
    block = BasicBlock(4, 4).eval()
    torch.nn.init.zeros_(block.bn2.weight)  # the residual branch now outputs bn2's shift, which is 0
    x = torch.randn(2, 4, 6, 6).relu()  # a block's input is the previous block's relu output
    torch.testing.assert_close(block(x), x)  # the identity skip makes "do nothing" the easy solution


def test_load_cifar10_reads_a_local_parquet_file_of_png_images(tmp_path):
    from PIL import Image

    colors, labels = [(255, 0, 0), (0, 128, 255), (10, 20, 30)], [0, 5, 9]
    rows = []
    for c in colors:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), c).save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue(), "path": None})  # the hub's parquet layout of an image
    pq.write_table(pa.table({"img": rows, "label": labels}), tmp_path / "train.parquet")
    x, y = load_cifar10(str(tmp_path / "train.parquet"), cache_dir=str(tmp_path / "cache"))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == labels
    torch.testing.assert_close(x[:, :, 5, 7], torch.tensor(colors, dtype=torch.float32) / 255)  # PNG is lossless
    x_folder, _ = load_cifar10(str(tmp_path), limit=2, cache_dir=str(tmp_path / "cache"))  # a folder of parquet files
    assert x_folder.shape == (2, 3, 32, 32)


def test_load_cifar10_names_the_columns_it_needs(tmp_path):
    pq.write_table(pa.table({"picture": [b"x"], "label": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"columns \['picture', 'label'\]; CIFAR-10 needs an image column"):
        load_cifar10(str(tmp_path / "bad.parquet"), cache_dir=str(tmp_path / "cache"))
