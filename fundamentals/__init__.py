"""Deep learning from first principles, each piece checked against torch (notes/fundamentals.md).

autograd/  a reverse-mode autograd `Tensor` (torch only as array storage)
nn/, optim/  modules and optimizers on it; an MLP trained on scikit-learn's digits
cnn/       convolution as im2col + matmul, max pooling, a small CNN and a ResNet
rnn/       RNN and LSTM cells written out; a character-level LSTM on Tiny Shakespeare
vae/       a variational autoencoder and its ELBO
cli.py     the command line every script shares (presets, options, --out); common.py the rest
"""
