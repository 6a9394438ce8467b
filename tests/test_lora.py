"""LoRA fine-tuning: only the adapters train, the run starts at the base, and final/ holds the merged weights."""

from __future__ import annotations

import pytest
import torch
from helpers import run_smoke, tiny_policy

from reference_impls.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from reference_impls.models import load_policy
from reference_impls.models.lora import add_lora, merged_state_dict
from reference_impls.rewards import get_reward
from reference_impls.training.method import step_context


def test_adapters_start_at_the_base_and_merge_exactly():
    policy = tiny_policy("flow")
    before = {k: v.clone() for k, v in policy.denoiser.state_dict().items()}
    add_lora(policy.denoiser, rank=4)
    assert merged_state_dict(policy.denoiser).keys() == before.keys()
    assert all(torch.equal(merged_state_dict(policy.denoiser)[k], before[k]) for k in before)
    with torch.no_grad():
        for name, parameter in policy.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    plain = type(policy.denoiser).from_config(policy.denoiser.config)
    plain.load_state_dict(merged_state_dict(policy.denoiser))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([300.0, 700.0])
    cond = policy.encode_text(["a red circle", "two blue squares"]).hidden_states
    with torch.no_grad():
        expected = policy.denoiser(x, t, encoder_hidden_states=cond).sample
        assert torch.allclose(plain(x, t, encoder_hidden_states=cond).sample, expected, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_policy("flow").denoiser, rank=0)


def test_lora_training_moves_only_the_adapters_with_ratio_one_first():
    config = FlowGRPOConfig(reward="jpeg-compressibility", batch_size=4, group_size=2, num_steps=4,
                            minibatch_size=2, prompts="easy", lora_rank=4, learning_rate=1e-2)
    method = FlowGRPO(policy=tiny_policy("flow"), reward=get_reward(config.reward), config=config)
    frozen = {k: v.clone() for k, v in method.policy.denoiser.state_dict().items() if "lora_" not in k}
    trainable = {name for name, p in method.policy.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    metrics = method.train_step(step_context(0, 0))
    assert metrics["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    after = method.policy.denoiser.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    lora_b = [p for n, p in method.policy.denoiser.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().max()) > 0 for p in lora_b)


def test_lora_init_is_fixed_by_the_seed_not_by_the_global_generator():
    def adapters(seed: int, scramble: int) -> list[torch.Tensor]:
        config = FlowGRPOConfig(reward="jpeg-compressibility", batch_size=4, group_size=2, num_steps=4,
                                minibatch_size=2, prompts="easy", lora_rank=4, seed=seed)
        policy = tiny_policy("flow")
        torch.manual_seed(scramble)  # whatever the caller did with torch's global generator before
        method = FlowGRPO(policy=policy, reward=get_reward(config.reward), config=config)
        return [p.detach().clone() for n, p in method.policy.denoiser.named_parameters() if "lora_A" in n]

    first, again, other = adapters(0, scramble=1), adapters(0, scramble=2), adapters(1, scramble=1)
    assert first and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_lora_run_writes_a_plain_final_model(tmp_path):
    records = run_smoke("flow-grpo", "jpeg-compressibility", tmp_path / "run", steps=2, lora_rank=4,
                        learning_rate=1e-2)
    assert records[-1]["step"] == 2
    final = load_policy(str(tmp_path / "run" / "final"))
    assert not any("lora_" in name for name, _ in final.denoiser.named_parameters())
    base = load_policy("shapes-flow")
    changed = [name for (name, p), (_, q) in zip(final.denoiser.named_parameters(), base.denoiser.named_parameters())
               if not torch.equal(p, q)]
    assert changed and all(any(k in name for k in ("to_q", "to_k", "to_v", "to_out")) for name in changed)
