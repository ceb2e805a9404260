"""Run by tests/test_scale_out.py in a subprocess: the online methods' data split and minibatch loss at world
size 2 (two gloo processes) against world size 1, on the same samples.

`python tests/scale_out_worker.py DATA_DIR OUT.json` writes, for GRPO and PPO:
- `prompts`: per iteration, the global rollout batch's rows (their keys) as PromptData gives them to one process,
  and as two ranks' shares put together;
- `loss` / `grad`: one minibatch's loss and gradients on one process, and the largest difference from two ranks
  each computing their half (gradients averaged as DDP does).
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.alignment.methods import grpo, ppo  # noqa: E402
from pipeline.config.model import GPTConfig  # noqa: E402
from pipeline.data.datamodules import PromptData  # noqa: E402
from pipeline.model.gpt import GPT  # noqa: E402
from pipeline.model.heads import ScalarHead  # noqa: E402

BATCH, STEPS, ROWS, PROMPT, RESPONSE, VOCAB = 8, 3, 8, 5, 6, 64


def tiny_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0))


def rollout() -> dict:
    """A fixed rollout batch of ROWS samples: [prompt | response] ids, ragged responses, old log-probs, advantages,
    values and returns, as the methods' rollout step leaves them."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, VOCAB, (ROWS, PROMPT + RESPONSE), generator=g)
    lengths = torch.randint(1, RESPONSE + 1, (ROWS,), generator=g)
    mask = torch.arange(RESPONSE)[None, :] < lengths[:, None]
    attn = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.bool), mask], 1)
    return {"seq": seq, "attn": attn, "mask": mask, "P": PROMPT,
            "logp": -torch.rand(ROWS, RESPONSE, generator=g) * 3, "adv": torch.randn(ROWS, RESPONSE, generator=g),
            "values": torch.randn(ROWS, RESPONSE, generator=g), "returns": torch.randn(ROWS, RESPONSE, generator=g),
            "row_adv": torch.randn(ROWS, generator=g), "ref_logp": -torch.rand(ROWS, RESPONSE, generator=g) * 3}


def objectives() -> dict:
    """name -> (module, loss of a minibatch of row indices); the same weights on every process."""
    common = {"steps": 1, "optim": {"lr": 1e-3}}
    grpo_cfg = grpo.Config.parse({"method": "grpo", "rollout_batch": 4, "group_size": 2, "minibatch_size": ROWS,
                                  "kl_coef": 0.1, **common})
    ppo_cfg = ppo.Config.parse({"method": "ppo", "rollout_batch": ROWS, "minibatch_size": ROWS, "entropy_coef": 0.01,
                                **common})
    g_mod = grpo.GRPO(tiny_gpt(1), tiny_gpt(2), None, grpo_cfg, seed=0)
    p_mod = ppo.PPO(tiny_gpt(1), tiny_gpt(2), ScalarHead(tiny_gpt(3)), ScalarHead(tiny_gpt(4)), None, ppo_cfg, 0)
    b = rollout()
    return {"grpo": (g_mod, g_mod.policy, lambda mb: g_mod.minibatch_loss(b, b["row_adv"], b["ref_logp"], mb)[0]),
            "ppo": (p_mod, torch.nn.ModuleList([p_mod.policy, p_mod.critic]),
                    lambda mb: p_mod.minibatch_loss(b, mb, train_policy=True)[0])}


def step(rows: torch.Tensor) -> dict[str, tuple[float, list[torch.Tensor]]]:
    """Each method's loss on `rows` and its gradients (averaged over the ranks when distributed)."""
    out = {}
    for name, (_, params, loss_of) in objectives().items():
        loss = loss_of(rows)
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params.parameters()]
        if dist.is_initialized():
            for gr in grads:
                dist.all_reduce(gr)
                gr /= dist.get_world_size()
            total = loss.detach().clone()
            dist.all_reduce(total)
            loss = total / dist.get_world_size()  # what the methods log: the mean over ranks (sync_dist)
        out[name] = (float(loss.detach()), grads)
    return out


def prompt_keys(data_dir: Path) -> list[list[str]]:
    data = PromptData(data_dir, BATCH, STEPS, seed=0)
    data.setup()
    return [[r["key"] + "/" + r["prompt"] for r in rows] for rows in data.train_dataloader()]


def rank_main(rank: int, world: int, port: int, data_dir: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mine = torch.arange(rank * ROWS // world, (rank + 1) * ROWS // world)  # this rank's half of the rollout
    losses = step(mine)
    keys = prompt_keys(Path(data_dir))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, keys)
    if rank == 0:
        torch.save({"losses": losses, "keys": everyone}, result)
    dist.destroy_process_group()


def main(data_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    single = step(torch.arange(ROWS))
    single_keys = prompt_keys(Path(data_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = out + ".pt"
    # fork: the children inherit the imports (a spawned child would import Lightning again, ~10 s each)
    mp.start_processes(rank_main, args=(2, port, data_dir, result), nprocs=2, join=True, start_method="fork")
    multi = torch.load(result, weights_only=True)
    report = {"prompts": {"one": single_keys,
                          "two": [a + b for a, b in zip(*multi["keys"])],
                          "per_rank": [len(k[0]) for k in multi["keys"]]}}
    for name, (loss, grads) in single.items():
        loss2, grads2 = multi["losses"][name]
        report[name] = {"loss_one": loss, "loss_two": loss2,
                        "grad_max_diff": max(float((a - b).abs().max()) for a, b in zip(grads, grads2)),
                        "grad_max": max(float(a.abs().max()) for a in grads)}
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
