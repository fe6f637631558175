"""Convolution written out (im2col), max pooling, a small CNN and a ResNet."""

from fundamentals.cnn.conv import Conv2d, MaxPool2d, conv2d, im2col, max_pool2d
from fundamentals.cnn.models import BasicBlock, ResNet, SmallCNN

__all__ = ["BasicBlock", "Conv2d", "MaxPool2d", "ResNet", "SmallCNN", "conv2d", "im2col", "max_pool2d"]
