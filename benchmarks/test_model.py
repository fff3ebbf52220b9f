"""Model-level benchmarks: images/s of the FER classifiers, dense timm ViTs vs their ``vit_bra_*`` versions, and
the baseline FER models when ``dynattn.models`` registers them.

One case = (device, model, image size, mode), built with ``timm.create_model(name, num_classes=7,
img_size=...)`` (random weights: speed does not depend on them):

* ``infer``: ``model.eval()``, ``torch.no_grad()``, one forward of a batch;
* ``train``: ``model.train()``, one optimisation step: forward, cross-entropy (plus the model's auxiliary losses
  when its ``forward`` takes ``targets``, as the FER training loop does), backward, ``AdamW.step()``.

CPU: float32, ``--threads`` threads, ViT-Ti and ViT-S (ViT-B is GPU only: minutes per case on 2 cores), batch 8 at
224 px and 2 at 448 px. CUDA: bfloat16 autocast (float32 weights and optimizer state), ViT-Ti/S/B, batch 64 at
224 px and 16 at 448 px. Every model runs at 224 and 448 px; ``vit_bra_*`` use their default routing (7x7
regions, ``topk`` from :func:`dynattn.nn.default_topk`: 16 at 224 px, 4 at 448 px).

``extra_info``: images/s, ms per batch, batch, parameters, forward GFLOPs per image
(:func:`dynattn.models.flops.count`, 2 FLOPs per multiply-add), and, added at the end of the run by
``conftest.py``, ``speedup_vs_dense_model``: the dense ViT's median / the ``vit_bra`` median at the same device,
image size, mode and batch, in this same run.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="the model benchmarks need timm")
import dynattn.models  # noqa: E402,F401  (registers vit_bra_* and the baselines with timm)

NUM_CLASSES = 7
MODES = ("infer", "train")
IMG_SIZES = (224, 448)
VIT_SIZES = {"cpu": ("tiny", "small"), "cuda": ("tiny", "small", "base")}
BASELINES = ("dan_resnet18", "mit_fer", "patt_lite")  # registered by dynattn.models when present
DENSE_OF = {f"vit_bra_{s}_patch16_224": f"vit_{s}_patch16_224" for s in ("tiny", "small", "base")}
BATCH = {("cpu", 224): 8, ("cpu", 448): 2, ("cuda", 224): 64, ("cuda", 448): 16}
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
# (minimum rounds, warm-up rounds, maximum rounds); the CPU's warm-up is the untimed first call
ROUNDS = {"cpu": (3, 0, 50), "cuda": (5, 2, 100)}


def _models(device: str):
    names = []
    for size in VIT_SIZES[device]:
        names += [f"vit_{size}_patch16_224", f"vit_bra_{size}_patch16_224"]
    return names + list(BASELINES)


def _cases():
    return [pytest.param(device, name, img, mode, id=f"{device}-{name}-{img}-{mode}")
            for device in ("cpu", "cuda") for mode in MODES for img in IMG_SIZES for name in _models(device)]


def _family(name: str) -> str:
    if name in DENSE_OF:
        return "vit_bra"
    return "dense_vit" if name in DENSE_OF.values() else "baseline"


@functools.lru_cache(maxsize=None)
def _flops(name: str, img_size: int) -> dict:
    """Forward GFLOPs per image (and routing facts for vit_bra) from dynattn.models.flops.count, on the meta
    device; ``{}`` with the reason when the counter cannot run the model."""
    from dynattn.models.flops import count

    try:
        info = count(name, img_size, num_classes=NUM_CLASSES)
    except Exception as e:  # a model the meta-device counter cannot build: report without GFLOPs
        return {"gflops_note": f"not counted: {type(e).__name__}: {e}"[:200]}
    out = {"gflops_per_image": info["gflops"]}
    if info.get("topk") is not None:
        out.update(topk=info["topk"], keys_per_query=info["keys_per_query"])
    return out


def _skip_reason(device: str, name: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible"
    if not timm.is_model(name):
        return f"{name} is not registered with timm (dynattn.models does not define it in this checkout)"
    return ""


def _step_fn(model, x, y, mode: str, device: str):
    """The timed call: one inference forward, or one training step."""
    def amp():
        if device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if mode == "infer":
        model.eval()

        def call():
            with torch.no_grad(), amp():
                return model(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        takes_targets = "targets" in inspect.signature(model.forward).parameters

        def call():
            opt.zero_grad(set_to_none=True)
            with amp():
                out = model(x, targets=y) if takes_targets else model(x)
                logits, aux = out if isinstance(out, tuple) else (out, {})
                loss = F.cross_entropy(logits.float(), y)
                for extra in (aux.values() if isinstance(aux, dict) else aux):
                    loss = loss + extra
            loss.backward()
            opt.step()
            return loss.detach()

    if device != "cuda":
        return call

    def synced():
        result = call()
        torch.cuda.synchronize()
        return result

    return synced


@pytest.mark.parametrize("device,name,img_size,mode", _cases())
def test_model(benchmark, request, model_results, device, name, img_size, mode):
    key = (device, DTYPE[device], img_size, mode, name)
    reason = _skip_reason(device, name)
    model = None
    if not reason:
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, num_classes=NUM_CLASSES, img_size=img_size)
        except TypeError as e:  # a model that does not take img_size: say so rather than time another size
            reason = f"{name} cannot be built at img_size={img_size}: {e}"
    if reason:
        model_results[key] = {"skipped": reason}
        pytest.skip(reason)

    batch = BATCH[(device, img_size)]
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    fn = _step_fn(model, x, y, mode, device)

    t0 = time.perf_counter()
    fn()  # untimed: allocates AdamW state, autotunes, warms caches; also the time estimate
    t_est = time.perf_counter() - t0
    min_rounds, warmup, max_rounds = ROUNDS[device]
    rounds = int(min(max_rounds, max(min_rounds, round(request.config.getoption("bench_seconds") / t_est))))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"model {device} {img_size}px {mode}"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)

    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    info = {
        "kind": "model", "device": device, "dtype": DTYPE[device], "model": name, "family": _family(name),
        "dense_model": DENSE_OF.get(name), "img_size": img_size, "mode": mode, "batch": batch,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": batch / median if median else None, "ms_per_batch": median * 1e3 if median else None,
        "threads": torch.get_num_threads(), "rounds": rounds, **_flops(name, img_size),
    }
    if device == "cuda":
        info.update(amp="bfloat16 autocast", gpu=torch.cuda.get_device_name(),
                    peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                    peak_mib_how="torch.cuda.max_memory_allocated over the timed rounds (weights, optimizer "
                                 "state, activations)")
    benchmark.extra_info.update(info)
    model_results[key] = {"median_s": median, "batch": batch, "dense_model": DENSE_OF.get(name),
                          "gflops_per_image": info.get("gflops_per_image")}
