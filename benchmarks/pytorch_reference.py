"""The issue's speed reference, re-measured on this machine: the first-order meta-training step in PyTorch
eager mode, structured like the public PyTorch port of the paper (markdtw/meta-learning-lstm-pytorch).

Written for this benchmark (not the port's code), it reproduces the port's structure, which sets its cost:
learner coordinates as the batch of an nn.LSTMCell whose input is the preprocessed loss expanded to every
coordinate next to the preprocessed gradient; the meta-learner cell as two (coordinates, 22) x (22, 1)
products on concatenated [h, theta, previous gate] columns; the inner-loop gradient from a second copy of the
learner into which theta is copied at each step; the query pass through the learner with theta as its
parameters; Adam and global-norm clipping.

PyTorch is not a dependency of keras_metalstm: `pip install torch` (a CPU build) to include this row.

    python benchmarks/pytorch_reference.py           # ms per 5-way 1-shot T=12 episode at 28x28
"""

import argparse
import json
import math
import statistics
import time


def conv4(nn, channels, image_size, n_way, filters=32):
    layers = []
    for block in range(4):
        layers += [
            nn.Conv2d(channels if block == 0 else filters, filters, 3, padding=1),
            nn.BatchNorm2d(filters, eps=1e-3, momentum=0.1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    side = image_size // 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * side * side, n_way))


def preprocess(torch, values, p=10.0):
    """The coordinate-wise preprocessing on a 1-D tensor: (n,) -> (n, 2)."""
    magnitude = values.abs()
    large = magnitude >= math.exp(-p)
    first = torch.where(large, torch.log(magnitude.clamp_min(1e-38)) / p, torch.full_like(values, -1.0))
    second = torch.where(large, torch.sign(values), math.exp(p) * values)
    return torch.stack([first, second], dim=1)


def measure(image_shape=(28, 28, 1), k_shot=1, inner_steps=12, query=15, steps=10, n_way=5):
    """Median ms of one meta-training episode."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as functional

    torch.manual_seed(0)
    height, _, channels = image_shape
    learner = conv4(nn, channels, height, n_way)
    gradient_learner = conv4(nn, channels, height, n_way)
    names = [name for name, _ in learner.named_parameters()]
    shapes = [parameter.shape for parameter in learner.parameters()]
    sizes = [parameter.numel() for parameter in learner.parameters()]
    coordinates = sum(sizes)

    lstm = nn.LSTMCell(4, 20)
    weight_f = nn.Parameter(torch.empty(22, 1).uniform_(-0.01, 0.01))
    weight_i = nn.Parameter(torch.empty(22, 1).uniform_(-0.01, 0.01))
    bias_f = nn.Parameter(torch.empty(1, 1).uniform_(4.0, 5.0))
    bias_i = nn.Parameter(torch.empty(1, 1).uniform_(-5.0, -4.0))
    theta0 = nn.Parameter(torch.cat([parameter.detach().reshape(-1) for parameter in learner.parameters()])[:, None])
    meta_parameters = [*lstm.parameters(), weight_f, weight_i, bias_f, bias_i, theta0]
    optimizer = torch.optim.Adam(meta_parameters, 1e-3)

    support = torch.rand(n_way * k_shot, channels, height, height)
    support_labels = torch.arange(n_way).repeat_interleave(k_shot)
    query_images = torch.rand(n_way * query, channels, height, height)
    query_labels = torch.arange(n_way).repeat_interleave(query)

    def unflatten(flat):
        parts = [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]
        return dict(zip(names, parts, strict=True))

    def episode():
        theta, lstm_state = theta0, None
        f_logit = i_logit = torch.zeros(coordinates, 1)
        for _ in range(inner_steps):
            with torch.no_grad():  # first order: the learner's gradient is a constant
                for target, value in zip(gradient_learner.parameters(), theta.detach().split(sizes), strict=True):
                    target.copy_(value.view_as(target))
            gradient_learner.zero_grad()
            loss = functional.cross_entropy(gradient_learner(support), support_labels)
            loss.backward()
            gradient = torch.cat([parameter.grad.reshape(-1) for parameter in gradient_learner.parameters()])
            features = torch.cat(
                [preprocess(torch, loss.detach()[None]).expand(coordinates, 2), preprocess(torch, gradient)], dim=1
            )
            lstm_state = lstm(features, lstm_state)
            f_logit = torch.cat([lstm_state[0], theta, f_logit], dim=1) @ weight_f + bias_f
            i_logit = torch.cat([lstm_state[0], theta, i_logit], dim=1) @ weight_i + bias_i
            theta = torch.sigmoid(f_logit) * theta - torch.sigmoid(i_logit) * gradient[:, None]
        logits = torch.func.functional_call(learner, unflatten(theta.view(-1)), (query_images,))
        query_loss = functional.cross_entropy(logits, query_labels)
        optimizer.zero_grad()
        query_loss.backward()
        nn.utils.clip_grad_norm_(meta_parameters, 0.25)
        optimizer.step()
        return query_loss.item()

    for _ in range(3):
        episode()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        episode()
        times.append((time.perf_counter() - start) * 1000)
    return {"ms": statistics.median(times), "parameters": coordinates, "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-shape", type=int, nargs=3, default=(28, 28, 1))
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--inner-steps", type=int, default=12)
    args = parser.parse_args()
    print(json.dumps(measure(tuple(args.image_shape), args.k_shot, args.inner_steps, steps=args.steps)))


if __name__ == "__main__":
    main()
