"""dynattn.fer prediction: face detection on a real photo, cropping, predict_image, the `predict` CLI and the
routing pictures (the captured routing index checked against q/k computed by hand from the layer weights)."""

import json
import os

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("cv2")
PIL_Image = pytest.importorskip("PIL.Image")
skimage_data = pytest.importorskip("skimage.data")

import dynattn  # noqa: E402
import dynattn.models  # noqa: E402,F401  (registers vit_bra_*)
from dynattn.fer import faces, routing_viz  # noqa: E402
from dynattn.fer.checkpoint import save_checkpoint  # noqa: E402
from dynattn.fer.predict import annotate_image, predict_image  # noqa: E402
from dynattn.fer.transforms import eval_transform  # noqa: E402

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
MODEL_KWARGS = dict(img_size=64, depth=2, num_regions=2, topk=2)
# skimage's astronaut (Eileen Collins, 512x512): by eye, her eyes are near (207, 100) and (243, 100) and her mouth
# near (225, 142); the face (brows to chin) spans about x 180-270, y 70-165.
EYES_MOUTH = [(207, 100), (243, 100), (225, 142)]


def _tiny_model(**kwargs):
    args = dict(MODEL_KWARGS, **kwargs)
    model = timm.create_model("vit_bra_tiny_patch16_224", num_classes=len(CLASSES), **args).eval()
    with torch.no_grad():  # timm zero-inits the head: give the classifier (and class token) a real say
        for name, p in model.named_parameters():
            if "token" in name or name.startswith("head"):
                p.normal_(0, 0.5)
    return model


def _config(**model_kwargs):
    return dict(model="vit_bra_tiny_patch16_224", model_kwargs=dict(MODEL_KWARGS, **model_kwargs),
                num_classes=len(CLASSES), classes=CLASSES, img_size=64, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5],
                dataset="synthetic", epoch=1, metrics={})


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _tiny_model()
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(os.path.join(d, "best"), model, _config())
    return str(d)


@pytest.fixture(scope="module")
def images(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("images")
    PIL_Image.fromarray(astronaut).save(d / "astronaut.png")
    PIL_Image.new("RGB", (160, 120), (128, 128, 128)).save(d / "blank.png")
    (d / "notes.jpg").write_text("this is not an image\n")
    return d


def _cli(argv):
    from dynattn.fer.cli import main

    return main(argv)


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- faces


def _contains(box, point):
    x0, y0, x1, y1 = box
    return x0 <= point[0] < x1 and y0 <= point[1] < y1


def test_detect_one_face_on_astronaut(astronaut):
    boxes = faces.detect_faces(astronaut)
    assert len(boxes) == 1
    x0, y0, x1, y1 = boxes[0]
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert all(_contains(boxes[0], p) for p in EYES_MOUTH)
    assert 60 <= x1 - x0 <= 150 and 60 <= y1 - y0 <= 150  # a face, not the whole upper body
    assert 195 <= (x0 + x1) / 2 <= 255 and 85 <= (y0 + y1) / 2 <= 145


def test_detect_faces_applies_exif_orientation(tmp_path, astronaut):
    upright = faces.detect_faces(astronaut)[0]
    exif = PIL_Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored turned a quarter to the left
    path = tmp_path / "sideways.jpg"
    PIL_Image.fromarray(astronaut).rotate(90, expand=True).save(path, quality=95, exif=exif)
    assert not faces.detect_faces(np.asarray(PIL_Image.open(path).convert("RGB")))  # sideways: no frontal face
    for source in (str(path), PIL_Image.open(path)):  # a file, or an image the caller opened
        boxes = faces.detect_faces(source)
        assert len(boxes) == 1
        assert np.abs(np.subtract(boxes[0], upright)).max() <= 6


def test_detect_faces_options_and_downscaling(astronaut):
    big = np.asarray(PIL_Image.fromarray(astronaut).resize((1536, 1536)))
    (box,) = faces.detect_faces(big, max_side=512)  # detected on a 512 px copy, mapped back to 1536 px
    assert all(_contains(box, (3 * x, 3 * y)) for x, y in EYES_MOUTH)
    assert faces.detect_faces(astronaut, min_size=200) == []
    assert faces.detect_faces(np.zeros((64, 64, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="scale_factor"):
        faces.detect_faces(astronaut, scale_factor=1.0)
    with pytest.raises(ValueError, match="min_size"):
        faces.detect_faces(astronaut, min_size=0)


def test_expand_box_and_crop_face():
    # 20% of a 50x100 box on each side, clipped at the image's edges
    assert faces.expand_box((10, 20, 60, 120), 0.2, 200, 200) == (0, 0, 70, 140)
    assert faces.expand_box((100, 100, 150, 200), 0.2, 160, 210) == (90, 80, 160, 210)
    assert faces.expand_box((0, 0, 10, 10), 0.0, 5, 5) == (0, 0, 5, 5)
    with pytest.raises(ValueError, match="outside"):
        faces.expand_box((300, 300, 310, 310), 0.1, 100, 100)
    with pytest.raises(ValueError, match="margin"):
        faces.expand_box((0, 0, 10, 10), -0.1, 100, 100)
    img = np.arange(100 * 80 * 3, dtype=np.uint8).reshape(100, 80, 3)
    crop, box = faces.crop_face(img, (10, 20, 30, 60), margin=0.5)
    assert box == (0, 0, 40, 80) and crop.size == (40, 80)
    np.testing.assert_array_equal(np.asarray(crop), img[0:80, 0:40])


def test_load_image_errors(images):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        faces.load_image(str(images / "missing.png"))
    with pytest.raises(ValueError, match="notes.jpg.*not a readable image"):
        faces.load_image(str(images / "notes.jpg"))
    with pytest.raises(TypeError, match="uint8"):
        faces.load_image(np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------------------------------------- predict_image


def test_predict_image_matches_hand_pipeline(astronaut):
    torch.manual_seed(0)
    model, config = _tiny_model(), _config()
    results = predict_image(model, config, astronaut, margin=0.25)
    (box,) = faces.detect_faces(astronaut)
    assert len(results) == 1
    r = results[0]
    assert set(r) == {"face", "box", "label", "score", "probabilities"}
    assert r["face"] == 0 and r["box"] == list(box)
    # independent path: crop by hand with the margin, the config's eval transform, the model, a softmax
    x0, y0, x1, y1 = box
    mx, my = 0.25 * (x1 - x0), 0.25 * (y1 - y0)
    crop = PIL_Image.fromarray(astronaut).crop((round(x0 - mx), round(y0 - my), round(x1 + mx), round(y1 + my)))
    with torch.no_grad():
        p = model(eval_transform(config)(crop)[None]).softmax(-1)[0]
    assert list(r["probabilities"]) == [CLASSES[i] for i in p.argsort(descending=True)]  # highest first
    np.testing.assert_allclose([r["probabilities"][c] for c in CLASSES], p.numpy(), atol=1e-5)
    assert r["label"] == CLASSES[int(p.argmax())] and r["score"] == pytest.approx(float(p.max()), abs=1e-5)
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    (whole,) = predict_image(model, config, astronaut, detect=False, top=2)
    assert whole["box"] == [0, 0, 512, 512] and len(whole["probabilities"]) == 2
    with torch.no_grad():
        p = model(eval_transform(config)(PIL_Image.fromarray(astronaut))[None]).softmax(-1)[0]
    assert whole["score"] == pytest.approx(float(p.max()), abs=1e-5)
    assert predict_image(model, config, np.full((90, 90, 3), 200, np.uint8)) == []
    with pytest.raises(ValueError, match="top"):
        predict_image(model, config, astronaut, top=0)


def test_annotate_image_draws_boxes(tmp_path, astronaut):
    res = [{"face": 0, "box": [177, 67, 270, 160], "label": "Happy", "score": 0.9}]
    out = annotate_image(astronaut, res, str(tmp_path / "a.png"))
    got = np.asarray(PIL_Image.open(out).convert("RGB")).astype(int)
    assert got.shape == astronaut.shape
    diff = np.abs(got - astronaut).sum(-1) > 0
    assert diff[67:160, 177].all() and diff[67:160, 269].all()  # the box's left and right edges
    assert not diff[200:, :].any() and not diff[:, 300:].any()  # nothing drawn far from the box


# ---------------------------------------------------------------------------------------------- routing


def _hand_routing(model, x):
    """Per layer: (q/k-based top-k sets computed from the weights, dynattn.route on those q/k, attention input)."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    out = []
    for blk in model.blocks:
        a = blk.attn
        xin = blk.norm1(h)
        qkv = (xin @ a.qkv.weight.T + a.qkv.bias).view(*xin.shape[:2], 3, a.num_heads, a.head_dim)
        B = xin.shape[0]
        q, k = qkv[:, 1:, 0].reshape(B, 4, 4, a.num_heads, a.head_dim), qkv[:, 1:, 1].reshape(B, 4, 4, a.num_heads,
                                                                                             a.head_dim)
        D = a.num_heads * a.head_dim
        # 2x2 regions of 2x2 tokens: pool (B, r, ty, c, tx, D) over the tokens of each region
        qr = q.reshape(B, 2, 2, 2, 2, D).mean((2, 4)).reshape(B, 4, D)
        kr = k.reshape(B, 2, 2, 2, 2, D).mean((2, 4)).reshape(B, 4, D)
        if a.per_head_routing:
            qh, kh = qr.view(B, 4, a.num_heads, a.head_dim), kr.view(B, 4, a.num_heads, a.head_dim)
            logits = torch.einsum("bqhd,bkhd->bhqk", qh, kh) * a.head_dim ** -0.5
        else:
            logits = qr @ kr.transpose(1, 2) * D ** -0.5
        sets = logits.topk(a.topk, dim=-1).indices.sort(-1).values
        routed = dynattn.route(q, k, 2, a.topk, per_head=a.per_head_routing)
        out.append((sets, routed, xin))
        h = blk(h)
    return out


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_capture_routing_is_the_routing_the_attention_uses(per_head):
    torch.manual_seed(1)
    model = _tiny_model(per_head_routing=per_head)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected_logits = model(x)
        with routing_viz.capture_routing(model) as cap:
            logits = model(x)
        hand = _hand_routing(model, x)
    assert torch.equal(logits, expected_logits)  # capturing changes nothing
    assert all(not blk.attn._forward_hooks for blk in model.blocks)  # hooks removed
    assert cap.names == ["blocks.0.attn", "blocks.1.attn"]
    assert cap.grid_size == [(4, 4)] * 2 and cap.num_regions == [(2, 2)] * 2
    for idx, (sets, routed, xin), blk in zip(cap.idx, hand, model.blocks):
        assert idx.shape == ((3, 3, 4, 2) if per_head else (3, 4, 2)) and idx.dtype == torch.int64
        assert torch.equal(idx, routed)
        assert torch.equal(idx.sort(-1).values, sets)
        with torch.no_grad():
            fused = blk.attn(xin)  # the fused route+attend path
            out, used = blk.attn(xin, return_routing=True)  # route, then attend with that index
        assert torch.equal(used, idx)
        torch.testing.assert_close(out, fused, atol=1e-6, rtol=1e-6)


def test_routing_maps_and_picture(tmp_path):
    torch.manual_seed(2)
    model = _tiny_model(per_head_routing=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), routing_viz.capture_routing(model) as cap:
        model(x)
    sel, counts = routing_viz.routing_maps(cap, 0, batch_index=1)
    idx = cap.idx[0][1]  # (heads, R, topk)
    for q in range(4):
        for kr in range(4):
            assert sel[q, kr] == pytest.approx((idx[:, q] == kr).any(-1).float().mean().item())
    assert sel.sum(1) == pytest.approx(np.full(4, 2.0))  # topk per query region
    np.testing.assert_allclose(counts.ravel(), sel.sum(0))
    assert routing_viz.region_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]

    img = routing_viz.denormalize(x[1], [0.5] * 3, [0.5] * 3)
    assert img.size == (64, 64)
    np.testing.assert_allclose(np.asarray(img) / 255.0, (x[1].permute(1, 2, 0).clamp(-1, 1) * 0.5 + 0.5).numpy(),
                               atol=1 / 255)
    path = routing_viz.draw_routing(img, cap, str(tmp_path / "r" / "routing.png"), batch_index=1)
    png = PIL_Image.open(path)
    assert png.format == "PNG" and png.width > 400 and png.height > 300
    routing_viz.draw_routing(img, cap, str(tmp_path / "q.png"), query_regions=[0, 3], layer=0)
    with pytest.raises(ValueError, match="query_regions"):
        routing_viz.draw_routing(img, cap, str(tmp_path / "bad.png"), query_regions=[4])
    with pytest.raises(ValueError, match="layer"):
        routing_viz.routing_maps(cap, 2)
    dense = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=64, depth=1)
    with pytest.raises(ValueError, match="no RoutedAttention"):
        routing_viz.capture_routing(dense)


# ---------------------------------------------------------------------------------------------- CLI


def test_predict_cli_json_lines_annotate_routing(run_dir, images, tmp_path, capsys, astronaut):
    ann, rout = tmp_path / "ann", tmp_path / "rout"
    rc = _cli(["predict", str(images / "astronaut.png"), str(images / "blank.png"), "--checkpoint", run_dir,
               "--annotate", str(ann), "--routing", str(rout), "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = _json_lines(out)
    assert len(lines) == 2 and len(out.strip().splitlines()) == 2
    face, blank = lines
    assert face["image"] == str(images / "astronaut.png") and face["face"] == 0
    assert list(face)[:6] == ["image", "face", "box", "label", "score", "probabilities"]
    assert face["box"] == list(faces.detect_faces(astronaut)[0])
    assert face["label"] in CLASSES and list(face["probabilities"])[0] == face["label"]
    assert len(face["probabilities"]) == 3 and face["score"] == max(face["probabilities"].values())
    # the CLI's numbers are predict_image's on the same checkpoint
    from dynattn.fer.checkpoint import load_model

    model, config = load_model(run_dir)
    (ref,) = predict_image(model, config, astronaut, top=3)
    assert face["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-6)
    assert blank["image"] == str(images / "blank.png") and blank["face"] is None and "no face" in blank["message"]

    annotated = PIL_Image.open(ann / "astronaut_annotated.png")
    assert annotated.size == (512, 512)
    assert os.listdir(ann) == ["astronaut_annotated.png"]  # nothing drawn for the image without a face
    assert PIL_Image.open(rout / "astronaut_face0_routing.png").format == "PNG"
    assert face["routing"] == str(rout / "astronaut_face0_routing.png")


def test_predict_cli_no_detect_and_bad_files(run_dir, images, capsys):
    rc = _cli(["predict", str(images / "notes.jpg"), str(images / "blank.png"), str(images / "missing.png"),
               "--checkpoint", run_dir, "--no-detect"])
    captured = capsys.readouterr()
    assert rc == 1  # some inputs failed; the readable one was still classified
    (line,) = _json_lines(captured.out)
    assert line["image"] == str(images / "blank.png") and line["box"] == [0, 0, 160, 120]
    assert len(line["probabilities"]) == len(CLASSES)
    assert "notes.jpg" in captured.err and "not a readable image" in captured.err
    assert "missing.png" in captured.err and "does not exist" in captured.err


def test_predict_cli_folder_input_and_option_errors(run_dir, images, tmp_path, capsys):
    rc = _cli(["predict", str(images), "--checkpoint", run_dir, "--no-detect", "--top", "1"])
    captured = capsys.readouterr()
    assert rc == 1  # notes.jpg in the folder is not an image
    assert [ln["image"] for ln in _json_lines(captured.out)] == [str(images / "astronaut.png"),
                                                                 str(images / "blank.png")]
    assert "notes.jpg" in captured.err

    assert _cli(["predict", str(images / "blank.png"), "--checkpoint", run_dir, "--top", "0"]) == 2
    assert "top must be None or a positive int" in capsys.readouterr().err
    assert _cli(["predict", str(images / "astronaut.png"), "--checkpoint", run_dir, "--scale-factor", "1"]) == 2
    captured = capsys.readouterr()
    assert "scale_factor must be > 1" in captured.err and captured.out == ""  # refused before any image
    assert _cli(["predict", str(images / "blank.png"), "--checkpoint", run_dir, "--routing", str(tmp_path),
                 "--routing-layer", "5"]) == 2
    assert "--routing-layer must be in [-2, 2)" in capsys.readouterr().err

    dense = timm.create_model("vit_tiny_patch16_224", num_classes=len(CLASSES), img_size=64, depth=1)
    cfg = dict(_config(), model="vit_tiny_patch16_224", model_kwargs=dict(img_size=64, depth=1))
    save_checkpoint(str(tmp_path / "dense" / "best"), dense, cfg)
    assert _cli(["predict", str(images / "blank.png"), "--checkpoint", str(tmp_path / "dense"),
                 "--routing", str(tmp_path / "r")]) == 2
    assert "--routing needs a model with routed attention" in capsys.readouterr().err
    assert _cli(["predict", str(images / "blank.png"), "--checkpoint", str(tmp_path / "dense"), "--no-detect"]) == 0
    assert _json_lines(capsys.readouterr().out)[0]["box"] == [0, 0, 160, 120]  # dense models predict fine
