"""WaveNet: the model, fast (queued) vs naive generation, real speech (CausalConv1d: tests/nn).

The generation tests take the `device` fixture, so the GPU check (scripts/gpu_check.sh, which
selects test ids containing "cuda") runs them on CUDA too: fused wavenet_step kernel vs naive.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import fastar
from fastar.data import mu_law_decode, mu_law_encode, read_wav, write_wav
from fastar.data.speech import ALSA_SOUNDS, load_speech
from fastar.models import WaveNet


# ---------------------------------------------------------------------------------------------
# WaveNet model


def _tiny(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(layers=6, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16, quantization=64)
    cfg.update(kw)
    m = WaveNet(**cfg).to(dtype)
    # Larger output weights: sharper distributions make a fast/naive mismatch show up as different samples.
    with torch.no_grad():
        m.out2.weight.mul_(4)
    return m.eval()


def test_receptive_field_and_dilations():
    m = WaveNet(layers=20, stacks=2)
    assert m.dilations == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] * 2
    assert m.receptive_field == 1 + 2 * 1023
    assert WaveNet(layers=6, stacks=2, kernel_size=3).receptive_field == 1 + 2 * 2 * 7
    with pytest.raises(ValueError, match="multiple of stacks"):
        WaveNet(layers=7, stacks=2)


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_forward_is_causal_and_nll_units(kernel_size):
    m = _tiny(kernel_size=kernel_size)
    x = torch.randint(0, 64, (2, 40))
    emb = m.input_conv.weight  # the gradient w.r.t. the embedded input shows what each output sees
    h = torch.nn.functional.one_hot(x, 64).double().requires_grad_(True)
    # rebuild the forward on one-hot inputs so autograd can see the dependence on each position
    inp = torch.cat([torch.nn.functional.one_hot(torch.full_like(x[:, :1], m.start_code), 64).double(), h[:, :-1]], 1)
    hidden = torch.einsum("btq,rq->brt", inp, emb[:, :, 0]) + m.input_conv.bias[:, None]
    logits = m._stack(hidden, None, None)
    torch.testing.assert_close(logits, m(x))
    t = 30
    logits[0, :, t].sum().backward()
    dep = h.grad[0].abs().sum(1) > 0
    assert not dep[t:].any(), "output t depends on x[t] or later"
    assert dep[t - 1] and dep[max(0, t - m.receptive_field + 1)]
    nats = m.nll(x)
    assert nats.shape == (x.shape[0],)
    torch.testing.assert_close(m.bits_per_dim(x), nats / (x.shape[1] * math.log(2)))
    torch.testing.assert_close(nats, torch.nn.functional.cross_entropy(m(x), x, reduction="none").sum(1))
    torch.testing.assert_close(m.loss(x), nats.mean())


COND_CASES = {
    "none": dict(),
    "speaker": dict(global_cond_channels=5, num_speakers=3),
    "gvector": dict(global_cond_channels=4),
    "local": dict(local_cond_channels=3, upsample_factors=[2, 3]),
    "both": dict(global_cond_channels=4, num_speakers=2, local_cond_channels=3),
}


def _cond_inputs(name, batch, length, dtype, seed=1, device="cpu"):
    gc, lc = _cond_inputs_cpu(name, batch, length, dtype, seed)
    return (None if gc is None else gc.to(device)), (None if lc is None else lc.to(device))


def _cond_inputs_cpu(name, batch, length, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    kw = COND_CASES[name]
    gc = lc = None
    if "num_speakers" in kw:
        gc = torch.randint(0, kw["num_speakers"], (batch,), generator=g)
    elif "global_cond_channels" in kw:
        gc = torch.randn(batch, kw["global_cond_channels"], generator=g, dtype=torch.float64).to(dtype)
    if "local_cond_channels" in kw:
        up = math.prod(kw.get("upsample_factors") or [1])
        lc = torch.randn(batch, kw["local_cond_channels"], -(-length // up), generator=g, dtype=torch.float64).to(dtype)
    return gc, lc


@pytest.mark.parametrize("kernel_size", [2, 3])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("cond", list(COND_CASES))
def test_fast_equals_naive_float64(device, kernel_size, batch, cond):
    m = _tiny(kernel_size=kernel_size, **COND_CASES[cond]).to(device)
    n = 36  # longer than the receptive field (15 / 29): the naive window slides
    gc, lc = _cond_inputs(cond, batch, n, torch.float64, device=device)
    out = {}
    for method in ("fast", "naive"):
        g = torch.Generator().manual_seed(7)
        out[method] = m.generate(n, batch_size=batch, global_cond=gc, local_cond=lc, generator=g, method=method,
                                 progress=False, return_logits=True)
    assert torch.equal(out["fast"][0], out["naive"][0])
    torch.testing.assert_close(out["fast"][1], out["naive"][1], rtol=1e-10, atol=1e-10)
    assert len(set(out["fast"][0].flatten().tolist())) > 5  # a real draw, not a constant


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_fast_equals_naive_float32_and_the_reference_queue(kernel_size):
    # CPU only: float32 draws agree "nearly always", and one draw over a CDF boundary changes
    # everything after it; the float32 CUDA paths are held to the teacher-forced logits below.
    m = _tiny(torch.float32, kernel_size=kernel_size, **COND_CASES["both"])
    gc, lc = _cond_inputs("both", 8, 24, torch.float32)
    res = []
    for method, backend in (("fast", "auto"), ("naive", "auto"), ("fast", "reference")):
        with fastar.backend(backend):
            res.append(m.generate(24, batch_size=8, global_cond=gc, local_cond=lc,
                                  generator=torch.Generator().manual_seed(3), method=method, progress=False))
    assert torch.equal(res[0], res[1])
    assert torch.equal(res[0], res[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cache_one_step_calls_equal_chunked_sampling_and_check_once(dtype):
    # The fused cache builds and checks the op's arguments once per run; one-step advances (the codec's
    # drive loop) must give the very bits of the chunked sampler, and a bad uniform anywhere in the run
    # is refused when the cache is made, not first met in some later chunk.
    from fastar import sampling
    from fastar.models.wavenet_cache import WaveNetFusedCache

    m = _tiny(dtype)
    T = 300                                   # 256 + 44: two chunks when sampling
    want = m.sample(2, (T,), generator=torch.Generator().manual_seed(4), progress=False)
    run = sampling.prepare(m, 2, (T,), None, torch.Generator().manual_seed(4))
    cache = m.allocate_inference_cache(run)
    if not isinstance(cache, WaveNetFusedCache):
        pytest.skip("wavenet_step's kernel is not built")
    with torch.no_grad():
        for t in range(T):
            cache.advance("chunk", t, 1)
    assert int(run.t[0]) == T
    assert torch.equal(run.seq.finish_values(run.values), want)
    bad = sampling.prepare(m, 2, (T,), None, torch.Generator().manual_seed(4))
    bad.noise[T - 3, 1] = 1.0                 # not a uniform in [0, 1), in the run's last chunk
    with pytest.raises(ValueError, match=r"must hold uniforms in \[0, 1\)"):
        m.allocate_inference_cache(bad)


def test_step_logits_equal_teacher_forced_forward(device):
    m = _tiny(torch.float32, **COND_CASES["local"]).to(device)
    _, lc = _cond_inputs("local", 4, 50, torch.float32, device=device)
    codes, logits = m.generate(50, batch_size=4, local_cond=lc, generator=torch.Generator().manual_seed(0),
                               progress=False, return_logits=True)
    with torch.no_grad():
        forced = m(codes, local_cond=lc)
    torch.testing.assert_close(logits, forced, rtol=1e-5, atol=1e-5)


def test_prime_continues_given_audio(device):
    m = _tiny().to(device)
    prime = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(5)).to(device)
    out = {}
    for method in ("fast", "naive"):
        out[method] = m.generate(15, prime=prime, generator=torch.Generator().manual_seed(2), method=method,
                                 progress=False, return_logits=True)
    assert out["fast"][0].shape == (3, 15)
    assert torch.equal(out["fast"][0], out["naive"][0])
    with torch.no_grad():
        forced = m(torch.cat([prime, out["fast"][0]], 1))
    torch.testing.assert_close(out["fast"][1], forced[:, :, 20:], rtol=1e-10, atol=1e-10)


def test_generate_bad_input():
    m = _tiny(**COND_CASES["both"])
    gc, lc = _cond_inputs("both", 2, 10, torch.float64)
    with pytest.raises(ValueError, match="cover 5 samples, but 10 are needed"):
        m.generate(10, batch_size=2, global_cond=gc, local_cond=lc[:, :, :5], progress=False)
    with pytest.raises(ValueError, match="global_cond has batch 2 but the audio has batch 3"):
        m.generate(10, batch_size=3, global_cond=gc, local_cond=lc, progress=False)
    with pytest.raises(ValueError, match="local_cond has batch 2 but the audio has batch 1"):
        m.generate(10, batch_size=1, global_cond=gc[:1], local_cond=lc, progress=False)
    with pytest.raises(ValueError, match="pass local_cond"):
        m.generate(10, batch_size=2, global_cond=gc, progress=False)
    with pytest.raises(ValueError, match="method must be"):
        m.generate(10, batch_size=2, global_cond=gc, local_cond=lc, method="slow", progress=False)
    with pytest.raises(ValueError, match="int64 mu-law codes"):
        m(torch.randn(2, 10), global_cond=gc, local_cond=lc)
    plain = _tiny()
    with pytest.raises(ValueError, match="built without global_cond_channels"):
        plain.generate(4, global_cond=gc, progress=False)


def _tiny_mix(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(layers=6, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16, output="mixture",
               num_mixtures=4)
    cfg.update(kw)
    m = WaveNet(**cfg).to(dtype)
    K = m.num_mixtures
    with torch.no_grad():
        m.out2.weight.mul_(4)
        m.out2.bias[2 * K:] -= 2.0  # log-scales near -2: draws spread over many bins, not piled at +-1
    return m.eval()


def test_mixture_head_shapes_input_and_nll_units():
    m = _tiny_mix()
    assert m.input_conv.weight.shape == (8, 1, 1)  # the embedding is a 1x1 conv of the previous scalar
    x = torch.rand(2, 30, dtype=torch.float64) * 2 - 1
    out = m(x)
    assert out.shape == (2, 12, 30)
    x2 = x.clone()
    x2[:, 20] = -x2[:, 20]
    torch.testing.assert_close(m(x2)[:, :, :21], out[:, :, :21])  # causal: position 20 sees x[:, :20]
    assert not torch.allclose(m(x2)[:, :, 21], out[:, :, 21])
    nats = m.nll(x)
    assert nats.shape == (2,) and torch.isfinite(nats).all()
    want = fastar.ops.discretized_mix_logistic_nll_ref(x, out, 4, num_bits=8, reduction="none").reshape(2, -1).sum(1)
    torch.testing.assert_close(nats, want)
    torch.testing.assert_close(m.bits_per_dim(x), nats / (30 * math.log(2)))
    with pytest.raises(ValueError, match="floats in"):
        m(torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_mixtures must be a positive int"):
        WaveNet(layers=2, stacks=1, output="mixture", num_mixtures=0)
    with pytest.raises(ValueError, match="num_bits must be an int"):
        WaveNet(layers=2, stacks=1, output="mixture", num_bits=0)


MIX_COND = ["none", "speaker", "both"]


@pytest.mark.parametrize("kernel_size", [2, 3])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("cond", MIX_COND)
def test_mixture_fast_equals_naive_float64(device, kernel_size, batch, cond):
    m = _tiny_mix(kernel_size=kernel_size, **COND_CASES[cond]).to(device)
    n = 36  # longer than the receptive field: the naive window slides
    gc, lc = _cond_inputs(cond, batch, n, torch.float64, device=device)
    out = {}
    for method in ("fast", "naive"):
        g = torch.Generator().manual_seed(7)
        out[method] = m.generate(n, batch_size=batch, global_cond=gc, local_cond=lc, generator=g, method=method,
                                 progress=False, return_logits=True)
    x, params = out["fast"]
    assert x.dtype == torch.float64 and x.shape == (batch, n) and params.shape == (batch, 12, n)
    assert torch.equal(x, out["naive"][0])
    torch.testing.assert_close(params, out["naive"][1], rtol=1e-10, atol=1e-10)
    assert len(set(x.flatten().tolist())) > 5  # a real draw, not a constant
    assert x.abs().max() <= 1
    torch.testing.assert_close((x + 1) * 127.5, ((x + 1) * 127.5).round(), rtol=0, atol=1e-9)  # 8-bit bins


def test_mixture_fast_equals_naive_and_reference_queue_float32_with_prime():
    # CPU only, as test_fast_equals_naive_float32_and_the_reference_queue.
    m = _tiny_mix(torch.float32, kernel_size=3, **COND_CASES["both"])
    gc, lc = _cond_inputs("both", 4, 30, torch.float32)
    prime = torch.rand(4, 10, generator=torch.Generator().manual_seed(4)) * 2 - 1
    res = []
    for method, backend in (("fast", "auto"), ("naive", "auto"), ("fast", "reference")):
        with fastar.backend(backend):
            res.append(m.generate(20, prime=prime, global_cond=gc, local_cond=lc,
                                  generator=torch.Generator().manual_seed(3), method=method, progress=False))
    assert res[0].shape == (4, 20) and res[0].dtype == torch.float32
    assert torch.equal(res[0], res[1])
    assert torch.equal(res[0], res[2])
    # generate_reference_queue (wavenet_step_ref per step) from the same uniforms
    # the engine draws (T, B, 2) uniforms up front; the op takes them as (B, 2, T)
    noise = torch.rand(30, 4, 2, generator=torch.Generator().manual_seed(3)).permute(1, 2, 0).contiguous()
    samples = torch.zeros(4, 30)
    samples[:, :10] = prime
    m.generate_reference_queue(samples, noise, global_cond=gc, local_cond=lc, num_prime=10)
    assert torch.equal(samples[:, 10:], res[0])


def test_mixture_step_params_equal_teacher_forced_forward(device):
    m = _tiny_mix(torch.float32, **COND_CASES["local"]).to(device)
    _, lc = _cond_inputs("local", 4, 50, torch.float32, device=device)
    x, params = m.generate(50, batch_size=4, local_cond=lc, generator=torch.Generator().manual_seed(0),
                           progress=False, return_logits=True)
    with torch.no_grad():
        forced = m(x, local_cond=lc)
    torch.testing.assert_close(params, forced, rtol=1e-5, atol=1e-5)


def test_mixture_generate_bad_input():
    m = _tiny_mix()
    with pytest.raises(ValueError, match=r"prime must be floats in \[-1, 1\]"):
        m.generate(4, prime=torch.zeros(1, 3, dtype=torch.int64), progress=False)


def test_mixture_nll_falls_on_a_synthetic_signal():
    torch.manual_seed(0)
    m = WaveNet(layers=4, stacks=1, residual_channels=8, dilation_channels=8, skip_channels=16, output="mixture",
                num_mixtures=3)
    t = torch.arange(512, dtype=torch.float32)
    x = (0.6 * torch.sin(2 * math.pi * t / 32) + 0.2 * torch.sin(2 * math.pi * t / 9)).reshape(4, 128)
    x = torch.round((x + 1) * 127.5) / 127.5 - 1  # on the 8-bit bins
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = m.nll(x).mean() / x.shape[1]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses


# ---------------------------------------------------------------------------------------------
# Real data: speech, training, WAV output


def _train(m, codes, steps, seq=256, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    data = torch.cat(codes)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts.tolist()])
        loss = m.nll(x).mean() / seq
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(not os.path.isdir(ALSA_SOUNDS), reason=f"{ALSA_SOUNDS} missing: apt-get install alsa-utils")
def test_train_on_alsa_speech_loss_falls(tmp_path):
    speech = load_speech(16000)
    assert len(speech) >= 3 and all(a.abs().max() <= 1 for a in speech)
    codes = [mu_law_encode(a) for a in speech]
    torch.manual_seed(0)
    m = WaveNet(layers=6, stacks=2, residual_channels=16, dilation_channels=16, skip_channels=32)
    losses = _train(m, codes, steps=30)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert losses[-1] < math.log(256)


def test_train_on_a_voiced_signal_loss_falls():
    # A vowel-like signal (harmonics of 140 Hz with vibrato), always available, for the same check.
    t = torch.arange(16000 * 2) / 16000
    f0 = 140 * (1 + 0.02 * torch.sin(2 * math.pi * 5 * t))
    phase = 2 * math.pi * torch.cumsum(f0, 0) / 16000
    audio = sum(torch.sin(k * phase) / k for k in range(1, 6)) * 0.3
    codes = [mu_law_encode(audio.float())]
    torch.manual_seed(0)
    m = WaveNet(layers=6, stacks=2, residual_channels=16, dilation_channels=16, skip_channels=32)
    losses = _train(m, codes, steps=25)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_load_speech_error_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install alsa-utils"):
        load_speech(directory=str(tmp_path))


def test_generate_writes_wav_with_progress_bar(tmp_path, capsys):
    m = _tiny(torch.float32, quantization=256)
    codes = m.generate(400, batch_size=2, generator=torch.Generator().manual_seed(0), progress=True)
    err = capsys.readouterr().err
    assert "WaveNet cached sampling" in err and "400/400" in err  # tqdm's bar
    audio = mu_law_decode(codes)
    path = tmp_path / "sample.wav"
    write_wav(path, audio[0], 16000)
    back, rate = read_wav(path)
    assert rate == 16000 and back.shape == (400,)
    torch.testing.assert_close(back, audio[0], atol=2 / 32767, rtol=0)  # 16-bit rounding
