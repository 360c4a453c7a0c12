"""PyTorch anchors for `astraea bench simulate`: one round's local training
of K clients, each holding `samples` MNIST-shaped samples, on the papers'
CNN (conv 12@5x5 s2, conv 18@3x3 s2, dropout 0.5, conv 24@2x2, dense 150,
dense 10), batch 20, one epoch, Adam 1e-3 (epsilon 1e-5, burn's default),
a fresh optimiser per client, starting from one global model.

Two ways, each printed as one JSON line {"path", "round_s"} (the median of
`--repeats` timed rounds after one warm-up):

- "torch per-client": one client after another, as most simulators do.
- "torch vmap": all K clients at once with torch.func
  (stack_module_state + functional_call + vmap(grad)), Adam applied to the
  stacked parameters (elementwise, so per client), dropout per client.

torch CPU from PyPI; not a dependency of the project. The data is random
(the speed of these operations does not depend on the values).
"""

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap


class Cnn(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 5, stride=2)
        self.conv2 = nn.Conv2d(12, 18, 3, stride=2)
        self.drop = nn.Dropout(0.5)
        self.conv3 = nn.Conv2d(18, 24, 2)
        self.fc1 = nn.Linear(24 * 4 * 4, 150)
        self.fc2 = nn.Linear(150, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.drop(torch.relu(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def per_client(global_model, images, labels, batch):
    loss_fn = nn.CrossEntropyLoss()
    for k in range(images.shape[0]):
        model = copy.deepcopy(global_model)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-5)
        order = torch.randperm(images.shape[1])
        for start in range(0, images.shape[1], batch):
            idx = order[start : start + batch]
            opt.zero_grad()
            loss = loss_fn(model(images[k, idx]), labels[k, idx])
            loss.backward()
            opt.step()


def vmapped(global_model, images, labels, batch):
    clients = images.shape[0]
    models = [copy.deepcopy(global_model) for _ in range(clients)]
    for m in models:
        m.train()
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(global_model).to("meta")

    def loss(p, b, x, y):
        logits = functional_call(base, (p, b), (x,))
        return nn.functional.cross_entropy(logits, y)

    step = vmap(grad(loss), in_dims=(0, 0, 0, 0), randomness="different")
    m1 = {k: torch.zeros_like(v) for k, v in params.items()}
    m2 = {k: torch.zeros_like(v) for k, v in params.items()}
    b1, b2, eps, lr = 0.9, 0.999, 1e-5, 1e-3
    order = torch.stack([torch.randperm(images.shape[1]) for _ in range(clients)])
    rows = torch.arange(clients)[:, None]
    t = 0
    for start in range(0, images.shape[1], batch):
        idx = order[:, start : start + batch]
        g = step(params, buffers, images[rows, idx], labels[rows, idx])
        t += 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        with torch.no_grad():
            for k in params:
                m1[k].mul_(b1).add_(g[k], alpha=1 - b1)
                m2[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                denom = (m2[k] / c2).sqrt_().add_(eps)
                params[k].addcdiv_(m1[k], denom, value=-lr / c1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = torch.rand(args.clients, args.samples, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (args.clients, args.samples), device=device)
    global_model = Cnn().to(device)
    for name, fn in [("torch per-client", per_client), ("torch vmap", vmapped)]:
        fn(global_model, images, labels, args.batch)
        times = []
        for _ in range(max(1, args.repeats)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(global_model, images, labels, args.batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(json.dumps({"path": name, "round_s": statistics.median(times)}), flush=True)


if __name__ == "__main__":
    main()
