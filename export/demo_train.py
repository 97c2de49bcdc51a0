"""Training loops for the demo models: pre-train a base on token blocks, fine-tune a LoRA adapter on chat turns.

Both run on a fixed number of torch threads (not the machine's core count) with torch's
deterministic algorithms and draw their batches from a seeded generator, so a seed gives the same
weights on the same machine every time. The tiny model trains on one thread: its matrices are so
small that two threads mostly spin-wait on each other, badly so on a busy machine (measured at
load 6 on 2 cores: one thread 80 s wall, two threads 361 s). The mid model's are large enough for two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

WARMUP = 20

OnStep = Callable[[int, float], None]


@dataclass(frozen=True)
class Schedule:
    """Steps, batch and peak learning rate of one training phase."""

    steps: int
    batch: int
    lr: float


@contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, pin its thread count and require deterministic kernels; restore both afterwards."""
    import torch

    saved, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        torch.use_deterministic_algorithms(strict)


def _optimizer(params: list, schedule: Schedule):
    """AdamW with a short warm-up and a linear decay to 5% of the peak rate."""
    import torch

    opt = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)
    decay = lambda step: min(1.0, (step + 1) / WARMUP) * max(0.05, 1.0 - step / schedule.steps)  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, decay)


def _train(model, batches: Iterator[tuple], schedule: Schedule, on_step: OnStep) -> float:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt, lr = _optimizer(params, schedule)
    model.train()
    loss = float("nan")
    for step in range(schedule.steps):
        input_ids, mask, labels = next(batches)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.detach().item()
        on_step(step + 1, loss)
    model.eval()
    return loss


def pretrain(model, tokens: list[int], block: int, schedule: Schedule, seed: int, on_step: OnStep) -> float:
    """Next-token training on random ``block``-token windows of ``tokens``; return the last loss."""
    import torch

    stream = torch.tensor(tokens)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            starts = torch.randint(0, len(stream) - block, (schedule.batch,), generator=gen)
            x = torch.stack([stream[s: s + block] for s in starts.tolist()])
            yield x, torch.ones_like(x), x

    return _train(model, batches(), schedule, on_step)


def finetune(model, examples: list[tuple[list[int], list[int]]], pad_id: int, schedule: Schedule, seed: int,
             on_step: OnStep) -> float:
    """Train on (prompt ids, reply ids) pairs, the loss on the reply only; epochs in seeded order."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            order = torch.randperm(len(examples), generator=gen).tolist()
            for i in range(0, len(order) - schedule.batch + 1, schedule.batch):
                rows = [examples[j] for j in order[i: i + schedule.batch]]
                width = max(len(p) + len(r) for p, r in rows)
                ids, mask, labels = [], [], []
                for prompt, reply in rows:
                    pad = width - len(prompt) - len(reply)
                    ids.append(prompt + reply + [pad_id] * pad)
                    mask.append([1] * (len(prompt) + len(reply)) + [0] * pad)
                    labels.append([-100] * len(prompt) + reply + [-100] * pad)
                yield torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)

    return _train(model, batches(), schedule, on_step)
