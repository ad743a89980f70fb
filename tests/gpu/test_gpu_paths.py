"""What only a GPU can run: bf16 autocast and fp16 training steps (with fused Adam and the compiled
model), the compiled loss's Triton kernels, the flash attention kernel, NCCL, translation on the GPU.
Skipped, and listed as skipped, on machines without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.jobs.tiny_model import trained_export  # noqa: F401 - a fixture: one tiny trained export
from transformer import build_model, preset
from transformer.decoding import Decoding
from transformer.loss import label_smoothed_loss

pytestmark = pytest.mark.gpu
VOCAB = 64


def _batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (8, 12), generator=generator).to(device)
    tgt = torch.randint(4, VOCAB, (8, 10), generator=generator).to(device)
    return src, tgt[:, :-1], tgt[:, 1:]


def _loss(model, src, tgt_in, tgt_out) -> torch.Tensor:
    at = torch.arange(tgt_out.numel(), device=tgt_out.device)
    loss, _ = label_smoothed_loss(model(src, tgt_in, at), tgt_out.flatten(), 0.1, 0)
    return loss / at.numel()


def test_bf16_autocast_step_matches_fp32() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=VOCAB)).to(device)
    batch = _batch(device)
    reference = _loss(model, *batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = _loss(model, *batch)
    mixed.backward()
    assert torch.isfinite(mixed) and abs(mixed.item() - reference.item()) < 0.05 * reference.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_flash_attention_kernel_runs_the_unmasked_causal_self_attention() -> None:
    """Without padding the decoder's self-attention passes no mask, only is_causal, so the flash
    kernel (which takes no mask) can run it; restricted to that kernel, the forward must work."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from transformer.attention import MultiHeadAttention

    attention = MultiHeadAttention(256, 4, 64, 64).to("cuda", torch.bfloat16)
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = attention(x, causal=True)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_flash_attention_kernel_runs_a_whole_unpadded_batch() -> None:
    """A batch whose sources have no padding (the host knows it: src_padded=False) runs every
    attention of the model (encoder, causal decoder, cross) on the flash kernel, backward too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = build_model(preset("small", vocab_size=VOCAB)).to("cuda", torch.bfloat16)
    src, tgt_in, _ = _batch(torch.device("cuda"))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits = model(src, tgt_in, src_padded=False)
        logits.float().sum().backward()
    assert torch.isfinite(logits).all()


def test_the_compiled_loss_follows_the_eager_one_in_bf16() -> None:
    """Training's loss with a compiled model (inductor's Triton kernels here): the figures and the
    bf16 gradient of the paper's vocabulary size within bf16 rounding of the eager path's."""
    generator = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(4096, 37000, generator=generator)).cuda().bfloat16()
    targets = torch.randint(0, 37000, (4096,), generator=generator).cuda()
    targets[:300] = 0  # padding
    figures, gradients = [], []
    for compiled in (False, True):
        leaf = logits.clone().requires_grad_()
        loss, nll = label_smoothed_loss(leaf, targets, 0.1, 0, compiled=compiled)
        loss.backward()
        figures.append(torch.stack([loss.detach(), nll]))
        gradients.append(leaf.grad.float())
    torch.testing.assert_close(figures[1], figures[0], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-2, atol=1e-9)


def test_translation_on_the_gpu_decides_as_on_the_cpu(trained_export) -> None:
    """`aiayn translate --device auto` picks the GPU; its greedy output parts from the CPU's only where
    the decision was within float rounding."""
    from jobs.inference.evaluation import inference_device, open_translator
    from jobs.inference.export import load_export
    from tests.agreement import greedy_disagreements, teacher_forced
    from tests.jobs.tiny_model import sources_of

    assert inference_device("auto") == "cuda"
    sources = sources_of(trained_export, 100)
    on_gpu, _ = open_translator(trained_export, "torch", Decoding(beam_size=1), device="cuda")
    on_cpu, _ = open_translator(trained_export, "torch", Decoding(beam_size=1), device="cpu")
    model, _, _ = load_export(trained_export)
    assert greedy_disagreements(teacher_forced(model), sources, on_cpu(sources), on_gpu(sources), 1e-2) == []


def test_beam_search_on_the_gpu_decides_as_on_the_cpu(trained_export) -> None:
    """The paper's beam search on the GPU (the host looks every 8 steps, caches are gathered into
    new buffers by row, sentences leave the batch as they end) chooses as on the CPU wherever the
    decision was not within float rounding."""
    from jobs.inference.evaluation import open_translator
    from jobs.inference.export import load_export
    from tests.agreement import beam_disagreements, gnmt, teacher_forced
    from tests.jobs.tiny_model import sources_of

    sources = sources_of(trained_export, 100)
    on_gpu, _ = open_translator(trained_export, "torch", Decoding(), device="cuda")
    on_cpu, _ = open_translator(trained_export, "torch", Decoding(), device="cpu")
    model, _, _ = load_export(trained_export)
    assert beam_disagreements(teacher_forced(model), sources, on_cpu(sources), on_gpu(sources), 1e-2,
                              our_criterion=gnmt(0.6), their_criterion=gnmt(0.6)) == []


def test_deepspeed_fp16_step_over_nccl(tmp_path, monkeypatch) -> None:
    """A one-rank NCCL process group, DeepSpeed fp16 with dynamic loss scaling, through the same
    engine builder and DeepSpeed config the workers use."""
    import torch.distributed as dist

    from data_pipeline.batching import Batch
    from jobs.run.config import load_job_config
    from jobs.train.collectives import all_sum
    from jobs.train.engine import build_engine, train_step

    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("nccl")
    try:
        assert all_sum([1.5, 2.0]) == [1.5, 2.0]
        job = load_job_config(None, ["model.preset=tiny", "train.precision=fp16", "train.zero_stage=2",
                                     "cluster.use_gpu=true"])
        model_config = job.model.replace(vocab_size=VOCAB)
        engine, _ = build_engine(job, model_config, 1, load_universal=False)
        assert engine.is_compiled  # train.compile defaults to on where there are GPUs
        assert engine.optimizer.optimizer.defaults["fused"]  # torch's fused Adam inside ZeRO
        src, tgt_in, tgt_out = _batch(engine.device)
        batch = Batch(src=src.cpu(), tgt_in=tgt_in.cpu(), tgt_out=tgt_out.cpu())
        losses = [train_step(engine, [batch], float(batch.target_tokens), 1, 0.1).loss for _ in range(10)]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    finally:
        dist.destroy_process_group()


def test_beam_search_two_stage_top_k_on_the_gpu() -> None:
    """Beam search's top-k (blocks of 64 columns, then the best blocks' columns) on the device
    tensors a GPU search holds: the values torch's own top-k gives, and their columns."""
    from transformer.decoding import _row_topk

    x = torch.randn(272, 37000, device="cuda").log_softmax(-1)
    values, columns = _row_topk(x, 8)
    torch.testing.assert_close(values, x.topk(8, dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(x.gather(1, columns), values, rtol=0, atol=0)
