"""FER dataset loaders, each on small files written here in the dataset's real on-disk format.

Expected labels, crops and splits are written out by hand from the formats' documentation (FER_REFERENCE.md and
the datasets' official tools), not computed with the loaders' own helpers.
"""

import csv
import json
import os
import unicodedata
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dynattn.fer.datasets import (
    DATASETS,
    AffectNet7,
    AffectNet8,
    ClassFolder,
    DatasetFormatError,
    FER2013,
    FERPlus,
    KoreanEmotion,
    RAFDB,
    build_dataset,
    collate_skip_none,
    dataset_names,
    votes_to_label,
)

# ---------------------------------------------------------------------------------------------------- helpers


def write_jpeg(path, size=(32, 32), color=(200, 30, 30), exif_orientation=None, image=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = image if image is not None else Image.new("RGB", size, color)
    kwargs = {"quality": 95, "subsampling": 0}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(path, "JPEG", **kwargs)
    return path


def rgb(img):
    return np.asarray(img.convert("RGB"), dtype=np.int32)


def pixel_row(value):
    """48x48 face whose pixel (r, c) is (value + r + c) % 256, as fer2013.csv writes it."""
    r, c = np.mgrid[:48, :48]
    return ((value + r + c) % 256).astype(np.uint8)


def fer_pixels_text(arr):
    return " ".join(str(int(v)) for v in arr.reshape(-1))


def write_fer2013(path, rows, header=("emotion", "pixels", "Usage")):
    """rows: (emotion, pixel text or base value, usage)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for emotion, px, usage in rows:
            w.writerow([emotion, px if isinstance(px, str) else fer_pixels_text(pixel_row(px)), usage])
    return path


def expect_warning(match):
    return pytest.warns(UserWarning, match=match)


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_errors(tmp_path):
    assert dataset_names() == sorted(["fer2013", "ferplus", "rafdb", "affectnet7", "affectnet8", "korean_emotion",
                                      "folder", "synthetic"])
    assert DATASETS["synthetic"] == "dynattn.fer.datasets.synthetic:SyntheticFaces"
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*'ferplus'"):
        build_dataset("nope", str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test'\]"):
        build_dataset("fer2013", str(tmp_path), "training")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\].*'aligned'"):
        build_dataset("rafdb", str(tmp_path), "train", colour=1)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_dataset("rafdb", str(tmp_path / "does-not-exist"), "train")
    with pytest.raises(ValueError, match="val_fraction expects a float, got 'abc'"):
        build_dataset("rafdb", str(tmp_path), "train", val_fraction="abc")


# ---------------------------------------------------------------------------------------------------- FER2013


def test_fer2013_splits_labels_pixels(tmp_path):
    rows = [(3, 10, "Training"), (0, 20, "PublicTest"), (6, 30, "Training"), (5, 40, "PrivateTest"),
            (1, 50, "Training")]
    path = write_fer2013(tmp_path / "fer2013.csv", rows)
    train = build_dataset("fer2013", str(tmp_path), "train")  # a directory holding fer2013.csv
    val = FER2013(str(path), "val")  # the csv itself
    test = FER2013(str(path), "test")
    assert train.classes == ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
    assert train.targets == [3, 6, 1] and val.targets == [0] and test.targets == [5]
    assert train.row_indices.tolist() == [0, 2, 4]
    img, label = train[1]
    assert label == 6 and img.size == (48, 48) and img.mode == "RGB"
    a = rgb(img)
    np.testing.assert_array_equal(a[..., 0], pixel_row(30))
    np.testing.assert_array_equal(a[..., 1], a[..., 2])
    assert train.pixels.dtype == np.uint8 and train.pixels.shape == (3, 48, 48)


def test_fer2013_broken_pixels_skipped_or_strict(tmp_path):
    short = " ".join(["7"] * 2303)
    rows = [(3, 10, "Training"), (2, short, "Training"), (4, 12, "Training"),
            (4, fer_pixels_text(pixel_row(0)).replace("0", "300", 1), "Training"), (1, 13, "Training")]
    path = write_fer2013(tmp_path / "fer2013.csv", rows)
    with expect_warning(r"skipped 2 row\(s\).*line 3: expected 2304 pixel values, got 2303.*line 5: .*0\.\.255"):
        ds = FER2013(str(path), "train")
    assert ds.targets == [3, 4, 1]
    assert [(os.path.basename(f), ln) for f, ln, _ in ds.skipped] == [("fer2013.csv", 3), ("fer2013.csv", 5)]
    with pytest.raises(DatasetFormatError, match=r"fer2013\.csv, line 3: expected 2304 pixel values"):
        FER2013(str(path), "train", strict=True)


@pytest.mark.parametrize("rows, header, message", [
    ([(9, 1, "Training")], ("emotion", "pixels", "Usage"), r"line 2: emotion must be an int in 0\.\.6, got '9'"),
    ([("x", 1, "Training")], ("emotion", "pixels", "Usage"), r"line 2: emotion must be an int"),
    ([(1, 1, "Training"), (1, 1, "Train")], ("emotion", "pixels", "Usage"), r"line 3: Usage must be one of"),
    ([(1, 1, "Training")], ("emotion", "pixels", "usage_"), r"line 1: header must name the columns.*missing Usage"),
])
def test_fer2013_malformed_rows_raise_with_line(tmp_path, rows, header, message):
    path = write_fer2013(tmp_path / "fer2013.csv", rows, header=header)
    with pytest.raises(DatasetFormatError, match=message) as e:
        FER2013(str(path), "train")
    assert str(path) in str(e.value)


def test_fer2013_other_column_order(tmp_path):
    """Kaggle's icml_face_data.csv spells the header 'emotion, Usage, pixels'."""
    with open(tmp_path / "icml_face_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", " Usage", " pixels"])
        w.writerow([2, "PublicTest", " " + fer_pixels_text(pixel_row(7))])
    ds = FER2013(str(tmp_path / "icml_face_data.csv"), "val")
    assert ds.targets == [2]
    np.testing.assert_array_equal(rgb(ds[0][0])[..., 0], pixel_row(7))


def test_fer2013_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="fer2013.csv"):
        FER2013(str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------------- FERPlus

# vote columns: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF
VOTE_CASES = [
    # votes                            majority   probability (label, non-zero shares)
    ([0, 10, 0, 0, 0, 0, 0, 0, 0, 0], 1, (1, {1: 1.0})),
    ([4, 0, 0, 1, 3, 2, 0, 0, 0, 0], None, (0, {0: 4 / 7, 4: 3 / 7})),  # 4 of 9 after outliers: no majority
    ([6, 0, 0, 0, 0, 0, 0, 0, 4, 0], 0, (0, {0: 1.0})),  # unknown comes second: dropped from the distribution
    ([1, 0, 0, 0, 0, 0, 0, 0, 8, 1], None, None),  # winner is unknown
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None, None),  # winner is NF (not a face)
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], None, (0, {0: 0.5, 1: 0.5})),  # tie: both taken, label = first column
    ([2, 2, 2, 2, 0, 0, 0, 0, 0, 0], None, None),  # four emotions tie in: too many
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None, None),  # only single votes: all outliers
    ([2, 0, 0, 0, 0, 0, 0, 7, 1, 0], 7, (7, {7: 1.0})),  # contempt alone covers 7 of 9 >= 75% of the votes
    ([2, 0, 0, 0, 0, 0, 0, 5, 0, 0], 7, (7, {0: 2 / 7, 7: 5 / 7})),  # 5 of 7 < 75%: the next emotion joins
    ([0, 3, 3, 0, 0, 0, 0, 0, 4, 0], None, None),  # unknown has the most votes
    ([3, 0, 0, 0, 0, 0, 0, 0, 2, 2], None, None),  # unknown met after neutral is left out: 3 of 7 <= 50%
]


@pytest.mark.parametrize("votes, majority, probability", VOTE_CASES)
def test_ferplus_vote_rules(votes, majority, probability):
    got = votes_to_label(votes, "majority")
    if majority is None:
        assert got is None
    else:
        assert got[0] == majority and got[1][majority] == 1.0 and sum(got[1]) == 1.0
    for mode in ("probability", "crossentropy"):
        got = votes_to_label(votes, mode)
        if probability is None:
            assert got is None
        else:
            label, shares = probability
            want = np.zeros(8)
            for k, v in shares.items():
                want[k] = v
            assert got[0] == label
            np.testing.assert_allclose(got[1], want, atol=1e-12)


def test_ferplus_multi_target_rule():
    # >= 30% of 9 remaining votes: neutral (4) and anger (3) -> 7 of 9 > 50%, kept
    label, dist = votes_to_label([4, 0, 0, 1, 3, 2, 0, 0, 0, 0], "multi_target")
    assert label == 0
    np.testing.assert_allclose(dist, [4 / 7, 0, 0, 0, 3 / 7, 0, 0, 0])
    assert votes_to_label([3, 3, 3, 0, 0, 0, 0, 0, 0, 0], "multi_target")[0] == 0
    assert votes_to_label([2, 2, 2, 2, 2, 0, 0, 0, 0, 0], "multi_target") is None  # 20% each: nothing kept
    with pytest.raises(ValueError, match="label_mode must be one of"):
        votes_to_label([0] * 10, "vote")


FERPLUS_HEADER = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                  "contempt", "unknown", "NF"]
# (usage, votes, has name); the pixel value base of data row i is 10 * i
FERPLUS_ROWS = [
    ("Training", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], True),  # 0: happiness
    ("Training", [4, 0, 0, 1, 3, 2, 0, 0, 0, 0], True),  # 1: no majority; probability keeps (neutral)
    ("Training", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], True),  # 2: NF, dropped
    ("Training", [0, 0, 9, 0, 0, 0, 0, 0, 1, 0], False),  # 3: empty image name, skipped
    ("Training", [2, 0, 0, 0, 0, 0, 0, 7, 1, 0], True),  # 4: contempt
    ("PublicTest", [0, 0, 0, 8, 2, 0, 0, 0, 0, 0], True),  # 5: sadness
    ("PrivateTest", [0, 0, 0, 0, 0, 0, 9, 0, 1, 0], True),  # 6: fear
]


def write_ferplus(root, rows=FERPLUS_ROWS):
    os.makedirs(root, exist_ok=True)
    write_fer2013(os.path.join(root, "fer2013.csv"), [(0, 10 * i, u) for i, (u, _, _) in enumerate(rows)])
    with open(os.path.join(root, "fer2013new.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FERPLUS_HEADER)
        for i, (usage, votes, named) in enumerate(rows):
            w.writerow([usage, f"fer{i:07d}.png" if named else ""] + votes)


def test_ferplus_from_csv(tmp_path):
    write_ferplus(tmp_path)
    train = build_dataset("ferplus", str(tmp_path), "train")
    assert train.source == "csv"
    assert train.classes == ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
    assert train.image_names == ["fer0000000.png", "fer0000004.png"] and train.targets == [1, 7]
    assert train.samples[0].soft_label is None
    np.testing.assert_array_equal(rgb(train[1][0])[..., 0], pixel_row(40))  # pixels of data row 4
    assert FERPlus(str(tmp_path), "val").targets == [3]
    test = FERPlus(str(tmp_path), "test")
    assert test.targets == [6]
    np.testing.assert_array_equal(rgb(test[0][0])[..., 1], pixel_row(60))

    prob = FERPlus(str(tmp_path), "train", label_mode="probability")
    assert prob.image_names == ["fer0000000.png", "fer0000001.png", "fer0000004.png"]
    assert prob.targets == [1, 0, 7]
    np.testing.assert_allclose(prob.samples[1].soft_label, [4 / 7, 0, 0, 0, 3 / 7, 0, 0, 0])
    np.testing.assert_array_equal(rgb(prob[1][0])[..., 0], pixel_row(10))

    seven = build_dataset("ferplus", str(tmp_path), "train", num_classes="7", label_mode="probability")
    assert len(seven.classes) == 7 and "contempt" not in seven.classes
    assert seven.image_names == ["fer0000000.png", "fer0000001.png"]
    assert len(seven.samples[1].soft_label) == 7


def test_ferplus_from_generated_folders(tmp_path):
    """The layout of FERPlus' generate_training_data.py: PNGs + header-less label.csv per split folder."""
    write_ferplus(tmp_path)
    train_dir, valid_dir = tmp_path / "FER2013Train", tmp_path / "FER2013Valid"
    for d, rows in ((train_dir, [0, 1, 2, 4]), (valid_dir, [5])):
        os.makedirs(d)
        with open(d / "label.csv", "w", newline="") as f:
            w = csv.writer(f)
            for i in rows:
                extra = ["(0, 0, 48, 48)"] if d == valid_dir else []  # the older layout carries a box column
                w.writerow([f"fer{i:07d}.png"] + extra + FERPLUS_ROWS[i][1])
        for i in rows:
            Image.fromarray(pixel_row(10 * i)).save(d / f"fer{i:07d}.png")
    train = FERPlus(str(tmp_path), "train")
    assert train.source == "folders"
    assert train.image_names == ["fer0000000.png", "fer0000004.png"] and train.targets == [1, 7]
    np.testing.assert_array_equal(rgb(train[1][0])[..., 2], pixel_row(40))
    assert FERPlus(str(tmp_path), "val").targets == [3]
    os.remove(valid_dir / "label.csv")  # without label.csv the folder's votes come from fer2013new.csv
    val = FERPlus(str(tmp_path), "val")
    assert val.source == "folders" and val.targets == [3] and val.samples[0].source == str(valid_dir / "fer0000005.png")
    # no FER2013Test folder: auto falls back to fer2013.csv; source="folders" insists
    assert FERPlus(str(tmp_path), "test").source == "csv"
    with pytest.raises(FileNotFoundError, match="FER2013Test"):
        FERPlus(str(tmp_path), "test", source="folders")
    # a missing PNG is a broken row
    os.remove(train_dir / "fer0000004.png")
    with expect_warning(r"skipped 1 row\(s\).*label\.csv, line 4: image file .*fer0000004\.png"):
        assert FERPlus(str(tmp_path), "train").targets == [1]
    with pytest.raises(DatasetFormatError, match=r"label\.csv, line 4"):
        FERPlus(str(tmp_path), "train", strict=True)


def test_ferplus_malformed(tmp_path):
    write_ferplus(tmp_path)
    lines = (tmp_path / "fer2013new.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",0,0,0,0,0,0,0,0,0,10", ",0,0,0,0,0,0,0,0,0,ten")
    (tmp_path / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"fer2013new\.csv, line 4: vote count for 'NF'"):
        FERPlus(str(tmp_path), "train")
    write_ferplus(tmp_path, FERPLUS_ROWS[:5] + [("PrivateTest",) + FERPLUS_ROWS[5][1:]] + FERPLUS_ROWS[6:])
    rows = (tmp_path / "fer2013.csv").read_text().splitlines()
    rows[6] = rows[6].replace("PrivateTest", "PublicTest")
    (tmp_path / "fer2013.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetFormatError, match=r"line 7: Usage 'PrivateTest' differs from 'PublicTest'"):
        FERPlus(str(tmp_path), "test")
    os.remove(tmp_path / "fer2013new.csv")
    with pytest.raises(FileNotFoundError, match="fer2013new.csv"):
        FERPlus(str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------------- RAF-DB

RAF_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")


def write_rafdb(base, per_class_train=(10, 4, 3, 20, 6, 2, 1), n_test=5, aligned=True):
    lines, k = [], 0
    for label, n in enumerate(per_class_train, 1):
        for _ in range(n):
            k += 1
            lines.append((f"train_{k:05d}.jpg", label))
    for j in range(1, n_test + 1):
        lines.append((f"test_{j:04d}.jpg", (j % 7) + 1))
    os.makedirs(os.path.join(base, "EmoLabel"), exist_ok=True)
    with open(os.path.join(base, "EmoLabel", "list_patition_label.txt"), "w") as f:
        f.writelines(f"{n} {lab}\n" for n, lab in lines)
    for i, (name, label) in enumerate(lines):
        stem = name[:-4]
        if aligned:
            write_jpeg(os.path.join(base, "Image", "aligned", f"{stem}_aligned.jpg"), (16, 16), (label * 30, 0, 0))
        else:
            write_jpeg(os.path.join(base, "Image", "original", name), (24, 20), (0, label * 30, 0))
    return lines


def test_rafdb_labels_and_splits(tmp_path):
    base = tmp_path / "basic"
    lines = write_rafdb(str(base))
    test = RAFDB(str(tmp_path), "test")  # the parent of basic/ is accepted
    assert test.classes == RAF_CLASSES
    assert test.targets == [(j % 7) for j in range(1, 6)]  # labels 1..7 -> 0..6
    assert [os.path.basename(s.source) for s in test.samples] == [f"test_{j:04d}_aligned.jpg" for j in range(1, 6)]
    img, label = test[2]  # test_0003.jpg, file label 4 = Happiness
    assert RAF_CLASSES[label] == "Happiness" and abs(rgb(img)[..., 0].mean() - 120) < 4

    train = build_dataset("rafdb", str(base), "train", val_fraction="0.2", seed="3")
    val = RAFDB(str(base), "val", val_fraction=0.2, seed=3)
    names = lambda ds: {os.path.basename(s.source) for s in ds.samples}  # noqa: E731
    assert not names(train) & names(val)
    assert names(train) | names(val) == {n[:-4] + "_aligned.jpg" for n, _ in lines if n.startswith("train_")}
    # stratified: round(0.2 * n) of every class (at least 1 of classes with >= 2 images, none of a singleton)
    counts = (10, 4, 3, 20, 6, 2, 1)
    assert val.class_counts() == [2, 1, 1, 4, 1, 1, 0]
    assert [a + b for a, b in zip(train.class_counts(), val.class_counts())] == list(counts)
    assert RAFDB(str(base), "val", val_fraction=0.2, seed=3).samples == val.samples  # deterministic
    assert RAFDB(str(base), "val", val_fraction=0.2, seed=4).samples != val.samples


def test_rafdb_original_images_missing_and_malformed(tmp_path):
    base = tmp_path / "basic"
    write_rafdb(str(base), per_class_train=(2,) * 7, aligned=False)
    ds = build_dataset("rafdb", str(base), "test", aligned="false")
    assert ds[0][0].size == (24, 20) and ds.samples[0].source.endswith(os.path.join("original", "test_0001.jpg"))
    label_file = base / "EmoLabel" / "list_patition_label.txt"
    with expect_warning(r"skipped 5 row\(s\).*list_patition_label\.txt, line 15: image file .*test_0001_aligned"):
        assert len(RAFDB(str(base), "test")) == 0  # aligned images were not written
    text = label_file.read_text().splitlines()
    text[3] = "train_00004.jpg 8"
    label_file.write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetFormatError, match=r"list_patition_label\.txt, line 4: label must be an int in 1\.\.7"):
        RAFDB(str(base), "train", aligned=False)
    text[3] = "train_00004.jpg"
    label_file.write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetFormatError, match=r"line 4: expected '<image name> <label 1..7>'"):
        RAFDB(str(base), "train", aligned=False)
    os.remove(label_file)
    with pytest.raises(FileNotFoundError, match="list_patition_label.txt"):
        RAFDB(str(base), "train")


# ---------------------------------------------------------------------------------------------------- AffectNet


def write_affectnet_cropped(root, train_labels, val_labels, as_string=True):
    for set_name, labels in (("train_set", train_labels), ("val_set", val_labels)):
        for n, label in enumerate(labels):
            write_jpeg(os.path.join(root, set_name, "images", f"{n}.jpg"), (12, 12), (label * 20, 0, 0))
            os.makedirs(os.path.join(root, set_name, "annotations"), exist_ok=True)
            value = np.array(str(label)) if as_string else np.array(label, dtype=np.int64)
            np.save(os.path.join(root, set_name, "annotations", f"{n}_exp.npy"), value)
            np.save(os.path.join(root, set_name, "annotations", f"{n}_val.npy"), np.array("0.5"))


def test_affectnet_cropped_release(tmp_path):
    train_labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    val_labels = [7, 1, 10, 0, 6]
    write_affectnet_cropped(str(tmp_path), train_labels, val_labels)
    test8 = build_dataset("affectnet8", str(tmp_path), "test")
    assert test8.release == "cropped"
    assert test8.classes == ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
    assert test8.targets == [7, 1, 0, 6]  # 10 (No-Face) dropped
    test7 = AffectNet7(str(tmp_path), "test")
    assert len(test7.classes) == 7 and test7.targets == [1, 0, 6]  # contempt dropped too
    assert [os.path.basename(s.source) for s in test7.samples] == ["1.jpg", "3.jpg", "4.jpg"]
    train, val = AffectNet8(str(tmp_path), "train"), AffectNet8(str(tmp_path), "val")
    assert sorted(train.targets + val.targets) == sorted([x for x in train_labels if x < 8])
    assert val.class_counts() == [1] * 8  # 10% of 3 rounds to 0, raised to one per class
    assert not {s.source for s in train.samples} & {s.source for s in val.samples}


def test_affectnet_cropped_numeric_npy_and_errors(tmp_path):
    write_affectnet_cropped(str(tmp_path), [1, 2], [3, 4], as_string=False)
    assert AffectNet8(str(tmp_path), "test").targets == [3, 4]
    np.save(tmp_path / "val_set" / "annotations" / "1_exp.npy", np.array("eleven"))
    with pytest.raises(DatasetFormatError, match=r"1_exp\.npy: expression id must be an int in 0\.\.10"):
        AffectNet8(str(tmp_path), "test")
    np.save(tmp_path / "val_set" / "annotations" / "1_exp.npy", np.array("4"))
    os.remove(tmp_path / "val_set" / "images" / "0.jpg")
    with expect_warning(r"skipped 1 row.*0_exp\.npy: image file"):
        assert AffectNet8(str(tmp_path), "test").targets == [4]
    with pytest.raises(FileNotFoundError, match="neither the cropped release"):
        AffectNet8(str(tmp_path / "val_set" / "images"), "test")


AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                    "expression", "valence", "arousal"]


def test_affectnet_original_release_crops_face_box(tmp_path):
    images = tmp_path / "Manually_Annotated" / "Manually_Annotated_Images"
    # a 64x48 photo, blue everywhere except the face box x 16..40, y 8..40 which is red
    photo = Image.new("RGB", (64, 48), (0, 0, 255))
    photo.paste((255, 0, 0), (16, 8, 40, 40))
    write_jpeg(str(images / "101" / "aaa.jpg"), image=photo)
    write_jpeg(str(images / "101" / "bbb.jpg"), (30, 30), (0, 255, 0))
    write_jpeg(str(images / "7" / "ccc.jpg"), (30, 30), (0, 255, 0))
    lists = tmp_path / "Manually_Annotated_file_lists"
    os.makedirs(lists)
    rows_train = [["101/aaa.jpg", 16, 8, 24, 32, "1.0;2.0", 3, 0.1, 0.2],
                  ["101/bbb.jpg", 0, 0, 30, 30, "1.0;2.0", 9, 0.1, 0.2],  # Uncertain: dropped
                  ["101/missing.jpg", 0, 0, 30, 30, "", 1, 0, 0],  # listed but absent: broken row
                  ["7/ccc.jpg", 2, 2, 20, 20, "", 7, 0, 0]]
    for name, rows in (("training.csv", rows_train), ("validation.csv", [["7/ccc.jpg", 5, 5, 10, 10, "", 6, 0, 0]])):
        with open(lists / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(AFFECTNET_HEADER)
            w.writerows(rows)
    with expect_warning(r"skipped 1 row.*training\.csv, line 4: image file .*missing\.jpg"):
        ds = AffectNet8(str(tmp_path), "train")
    assert ds.release == "original"
    assert ds.targets == [3, 7]  # one image per class: nothing to hold out for val
    assert ds.samples[0].box == (16.0, 8.0, 40.0, 40.0)
    img = AffectNet8(str(tmp_path), "test")[0][0]
    assert img.size == (10, 10)
    with expect_warning("skipped 1 row"):
        tr7 = AffectNet7(str(tmp_path), "train")
    assert tr7.targets == [3]
    crop = rgb(tr7[0][0])
    assert crop.shape == (32, 24, 3)
    assert crop[2:-2, 2:-2, 0].min() > 200 and crop[2:-2, 2:-2, 2].max() < 60  # all red: the box, nothing else
    rows_train[0][6] = "happy"
    with open(lists / "training.csv", "w", newline="") as f:
        csv.writer(f).writerows([AFFECTNET_HEADER] + rows_train)
    with pytest.raises(DatasetFormatError, match=r"training\.csv, line 2: expression must be an int"):
        AffectNet8(str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------------- Korean set

K = {"anger": "분노", "anxiety": "불안", "happy": "기쁨", "hurt": "상처", "neutral": "중립", "panic": "당황",
     "sadness": "슬픔", "unknown": "알수없음", "none": None}
KOREAN_ORDER = ("anger", "anxiety", "happy", "hurt", "neutral", "panic", "sadness")


def krec(filename, uploader, annots, boxes):
    rec = {"filename": filename, "gender": "여", "age": 30, "isProf": "일반인", "faceExp_uploader": K[uploader]}
    for key, lab, box in zip(("annot_A", "annot_B", "annot_C"), annots, boxes):
        rec[key] = {"boxes": dict(zip(("maxX", "maxY", "minX", "minY"), (box[2], box[3], box[0], box[1]))),
                    "faceExp": K[lab], "bg": "실내"}
    return rec


BOX_A, BOX_B, BOX_C = (16, 16, 48, 56), (20, 24, 56, 64), (100, 100, 140, 150)
KOREAN_TRAIN = [  # filename, uploader, annotators A/B/C
    ("p1_여_30_기쁨_01.jpg", "happy", ("happy", "happy", "happy")),
    ("p2_남_20_불안_01.jpg", "anxiety", ("panic", "panic", "anxiety")),
    ("p3_여_40_슬픔_01.jpg", "sadness", ("hurt", "anger", "unknown")),
    ("p4_남_50_중립_01.jpg", "neutral", ("unknown", "unknown", "neutral")),
    ("p5_여_20_분노_01.jpg", "anger", ("anger", "anger", "unknown")),
    ("p6_남_30_분노_02.jpg", "anger", ("anger", "none", "anger")),  # an annotator without a label abstains
]


def write_korean(root, train=KOREAN_TRAIN, test_encoding="cp949", exif_file=None):
    """The AI-Hub layout: 1.Training / 2.Validation with 원천데이터 (images) and 라벨링데이터 (JSON)."""
    def images_for(split_dir, tag, emotion, names):
        d = os.path.join(root, split_dir, "원천데이터", f"[원천]EMOIMG_{emotion}_{tag}")
        for n in names:
            write_jpeg(os.path.join(d, n), (160, 160), (90, 90, 90))

    by_emotion = {}
    for name, uploader, annots in train:
        by_emotion.setdefault(K[uploader], []).append(krec(name, uploader, annots, (BOX_A, BOX_B, BOX_C)))
    for emotion, recs in by_emotion.items():
        images_for("1.Training", "TRAIN_01", emotion, [r["filename"] for r in recs])
        d = os.path.join(root, "1.Training", "라벨링데이터", f"[라벨]EMOIMG_{emotion}_TRAIN")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"img_emotion_training_data({emotion}).json"), "w", encoding="utf-8") as f:
            json.dump(recs, f, ensure_ascii=False, indent=2)
    test_recs = [krec("q1_남_60_상처_01.jpg", "hurt", ("hurt", "sadness", "hurt"), (BOX_A, BOX_B, BOX_C))]
    images_for("2.Validation", "VALID", K["hurt"], ["q1_남_60_상처_01.jpg"])
    d = os.path.join(root, "2.Validation", "라벨링데이터", f"[라벨]EMOIMG_{K['hurt']}_VALID")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"img_emotion_validation_data({K['hurt']}).json")
    with open(path, "wb") as f:
        f.write(json.dumps(test_recs, ensure_ascii=False, indent=1).encode(test_encoding))
    return path


def korean_labels(ds):
    return {unicodedata.normalize("NFC", os.path.basename(s.source)).split("_")[0]: ds.classes[s.label]
            for s in ds.samples}


@pytest.mark.parametrize("policy, expected", [
    ("uploader", {"p1": "happy", "p2": "anxiety", "p3": "sadness", "p4": "neutral", "p5": "anger", "p6": "anger"}),
    ("majority", {"p1": "happy", "p2": "panic", "p5": "anger", "p6": "anger"}),  # 2 of 3 agree; 알수없음 never counts
    ("unanimous", {"p1": "happy"}),
])
def test_korean_label_policies(tmp_path, policy, expected):
    write_korean(str(tmp_path / "092.data" / "01.데이터"))
    opts = dict(label_policy=policy, val_fraction=0.5)
    ds_train = build_dataset("korean_emotion", str(tmp_path), "train", **opts)
    ds_val = build_dataset("korean_emotion", str(tmp_path), "val", **opts)
    assert ds_train.classes == KOREAN_ORDER
    got = {**korean_labels(ds_train), **korean_labels(ds_val)}
    assert got == expected
    assert not set(korean_labels(ds_train)) & set(korean_labels(ds_val))
    boxes = {os.path.basename(s.source).split("_")[0]: s.box for s in ds_train.samples + ds_val.samples}
    if policy == "majority":
        assert boxes["p2"] == (18.0, 20.0, 52.0, 60.0)  # median of the two agreeing annotators (A, B)
    if policy == "uploader":
        assert boxes["p2"] == BOX_B  # median of all three annotators' boxes


def test_korean_cp949_test_split_and_crop(tmp_path):
    path = write_korean(str(tmp_path), test_encoding="cp949")
    with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
        f.read().decode("utf-8")  # really CP949, so the fallback is what reads it
    test = KoreanEmotion(str(tmp_path), "test")
    assert korean_labels(test) == {"q1": "hurt"}
    assert test.samples[0].box == BOX_B
    img, _ = test[0]
    assert img.size == (BOX_B[2] - BOX_B[0], BOX_B[3] - BOX_B[1])


def test_korean_utf8_bom_nfd_names_and_missing_image(tmp_path):
    root = tmp_path / "ds"
    write_korean(str(root), test_encoding="utf-8-sig")
    assert korean_labels(KoreanEmotion(str(root), "test")) == {"q1": "hurt"}
    # archives unpacked on macOS give NFD names: rename an image folder and file to NFD
    d = next((root / "1.Training" / "원천데이터").glob("*기쁨*"))
    nfd_dir = d.parent / unicodedata.normalize("NFD", d.name)
    os.rename(d, nfd_dir)
    os.rename(nfd_dir / "p1_여_30_기쁨_01.jpg", nfd_dir / unicodedata.normalize("NFD", "p1_여_30_기쁨_01.jpg"))
    ds = KoreanEmotion(str(root), "train", val_fraction=0.5)
    dv = KoreanEmotion(str(root), "val", val_fraction=0.5)
    assert len(ds) + len(dv) == 6
    os.remove(next((root / "1.Training" / "원천데이터").glob("*분노*/p5_*.jpg")))
    with expect_warning(r"skipped 1 row.*img_emotion_training_data\(분노\)\.json, line 2: image 'p5_"):
        KoreanEmotion(str(root), "train", val_fraction=0.5)
    with pytest.raises(DatasetFormatError, match=r"line 2: image 'p5_"):
        KoreanEmotion(str(root), "train", strict=True)


def test_korean_record_without_face_box_is_a_broken_row(tmp_path):
    write_korean(str(tmp_path), train=KOREAN_TRAIN[:1])
    json_path = next((tmp_path / "1.Training").rglob("*.json"))
    recs = json.loads(json_path.read_text(encoding="utf-8"))
    recs.append(dict(recs[0], filename="p1_여_30_기쁨_01.jpg"))
    for k in ("annot_A", "annot_B", "annot_C"):
        recs[1][k] = dict(recs[1][k], boxes={"minX": 50, "minY": 10, "maxX": 40, "maxY": 30})  # maxX < minX
    json_path.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    with expect_warning(r"skipped 1 row.*no valid face box"):
        assert len(KoreanEmotion(str(tmp_path), "train")) == 1
    with pytest.raises(DatasetFormatError, match="no valid face box"):
        KoreanEmotion(str(tmp_path), "train", strict=True)


def test_korean_exif_orientation_box_in_transposed_frame(tmp_path):
    """Boxes are in the EXIF-applied frame: the photo is stored rotated with Orientation=6."""
    write_korean(str(tmp_path), train=[("e1_여_30_기쁨_01.jpg", "happy", ("happy", "happy", "happy"))])
    # the upright photo is 64 wide x 96 tall with a green face box at x 16..48, y 32..80
    upright = Image.new("RGB", (64, 96), (128, 128, 128))
    upright.paste((0, 200, 0), (16, 32, 48, 80))
    stored = upright.rotate(90, expand=True)  # 96 x 64; Orientation 6 = "rotate 90 degrees clockwise to view"
    path = next((tmp_path / "1.Training").rglob("e1_*.jpg"))
    write_jpeg(str(path), image=stored, exif_orientation=6)
    json_path = next((tmp_path / "1.Training").rglob("*.json"))
    box = {"minX": 16, "minY": 32, "maxX": 48, "maxY": 80}
    recs = json.loads(json_path.read_text(encoding="utf-8"))
    for k in ("annot_A", "annot_B", "annot_C"):
        recs[0][k]["boxes"] = box
    json_path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    ds = KoreanEmotion(str(tmp_path), "train", val_fraction=0.5)
    img, label = ds[0]
    assert ds.classes[label] == "happy"
    a = rgb(img)
    assert a.shape == (48, 32, 3)  # (80 - 32) tall, (48 - 16) wide
    assert a[..., 1].mean() > 190 and a[..., 0].mean() < 20  # all green: the right region after rotation


@pytest.mark.parametrize("policy, edit, message", [
    ("uploader", lambda t: t.replace('"faceExp_uploader": "기쁨"', '"faceExp_uploader": "행복"'),
     r"line 2: faceExp_uploader must be one of"),
    ("majority", lambda t: t.replace('"faceExp": "기쁨"', '"faceExp": "?"', 1),
     r"line 2: annot_A\.faceExp must be one of"),
    ("unanimous", lambda t: t.replace('"faceExp": "기쁨"', '"faceExp": 3', 1),
     r"line 2: annot_A\.faceExp must be one of"),
    ("uploader", lambda t: t.replace('"filename": "p1_여_30_기쁨_01.jpg",', ""), r"line 2: record has no 'filename'"),
    ("uploader", lambda t: t.replace('"age": 30,', '"age": 30,,', 1), r"line 5: invalid JSON"),
    ("uploader", lambda t: "{" + t, r"line 1: invalid JSON"),
])
def test_korean_malformed_json_raises_with_line(tmp_path, policy, edit, message):
    write_korean(str(tmp_path), train=[("p1_여_30_기쁨_01.jpg", "happy", ("happy", "happy", "happy"))])
    json_path = next((tmp_path / "1.Training").rglob("*.json"))
    json_path.write_text(edit(json_path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=message) as e:
        KoreanEmotion(str(tmp_path), "train", label_policy=policy)
    assert "img_emotion_training_data(기쁨).json" in str(e.value)


def test_korean_second_record_line_and_missing_split(tmp_path):
    write_korean(str(tmp_path))
    json_path = next((tmp_path / "1.Training").rglob("*분노*.json"))
    recs = json.loads(json_path.read_text(encoding="utf-8"))
    bad = dict(recs[0], filename="p9.jpg", faceExp_uploader="화남")
    json_path.write_text(json.dumps([recs[0], bad], ensure_ascii=False, indent=1), encoding="utf-8")
    text = json_path.read_text(encoding="utf-8").splitlines()
    line = next(i for i, t in enumerate(text, 1) if '"p9.jpg"' in t) - 1  # the record's "{" is one line above
    with pytest.raises(DatasetFormatError, match=rf"line {line}: faceExp_uploader"):
        KoreanEmotion(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="1.Training"):
        KoreanEmotion(str(tmp_path / "2.Validation"), "train")
    with pytest.raises(ValueError, match="label_policy must be one of"):
        KoreanEmotion(str(tmp_path), "test", label_policy="vote")


# ---------------------------------------------------------------------------------------------------- folder


def test_class_folder_holdout_and_classes(tmp_path):
    for split, counts in (("train", {"happy": 10, "sad": 5, "angry": 3}), ("test", {"happy": 2, "sad": 1})):
        for cls, n in counts.items():
            for i in range(n):
                write_jpeg(str(tmp_path / split / cls / f"{i}.jpg"), (8, 8))
    (tmp_path / "train" / "happy" / "notes.txt").write_text("not an image")
    write_jpeg(str(tmp_path / "train" / "happy" / "x.PNG.jpeg"), (8, 8))
    train = build_dataset("folder", str(tmp_path), "train")
    val = build_dataset("folder", str(tmp_path), "val")
    assert train.classes == ("angry", "happy", "sad")
    assert [a + b for a, b in zip(train.class_counts(), val.class_counts())] == [3, 11, 5]
    assert val.class_counts() == [1, 1, 1]  # round(0.1 * n), at least one per class with >= 2 images
    assert not {s.source for s in train.samples} & {s.source for s in val.samples}
    test = ClassFolder(str(tmp_path), "test", classes="sad,happy,angry")
    assert test.classes == ("sad", "happy", "angry")
    assert sorted((os.path.basename(os.path.dirname(s.source)), s.label) for s in test.samples) == \
        [("happy", 1), ("happy", 1), ("sad", 0)]
    with pytest.raises(ValueError, match=r"classes \['disgust'\] have no folder"):
        ClassFolder(str(tmp_path), "test", classes=["happy", "disgust"])
    with pytest.warns(UserWarning, match=r"ignoring folders not in classes: \['angry'\]"):
        assert ClassFolder(str(tmp_path), "train", classes=("happy", "sad")).num_classes == 2
    # an explicit val folder is used as is
    write_jpeg(str(tmp_path / "val" / "sad" / "v.jpg"), (8, 8))
    assert ClassFolder(str(tmp_path), "val").targets == [2]
    assert sum(ClassFolder(str(tmp_path), "train").class_counts()) == 19
    with pytest.raises(FileNotFoundError, match="no <split>/<class>/"):
        ClassFolder(str(tmp_path / "train" / "happy"), "train")


# ---------------------------------------------------------------------------------------------------- images


def test_exif_orientation_applied(tmp_path):
    """A 40x20 JPEG, left half red / right half blue, tagged Orientation=6 (view rotated 90 degrees clockwise):
    the viewer sees a 20x40 picture, red on top."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    write_jpeg(str(tmp_path / "test" / "a" / "rot.jpg"), image=stored, exif_orientation=6)
    write_jpeg(str(tmp_path / "test" / "a" / "plain.jpg"), image=stored)
    ds = ClassFolder(str(tmp_path), "test")
    imgs = {os.path.basename(s.source): ds[i][0] for i, s in enumerate(ds.samples)}
    rot = rgb(imgs["rot.jpg"])
    assert rot.shape == (40, 20, 3)
    assert rot[:18, :, 0].mean() > 230 and rot[22:, :, 2].mean() > 230
    assert rgb(imgs["plain.jpg"]).shape == (20, 40, 3)


def test_unreadable_images_skipped_in_dataloader(tmp_path):
    for i in range(6):
        write_jpeg(str(tmp_path / "test" / "c" / f"{i}.jpg"), (16, 16))
    good = (tmp_path / "test" / "c" / "1.jpg").read_bytes()
    (tmp_path / "test" / "c" / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "test" / "c" / "4.jpg").write_bytes(os.urandom(300))  # garbage
    ds = ClassFolder(str(tmp_path), "test", transform=lambda im: torch.from_numpy(rgb(im)).permute(2, 0, 1))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)
    seen = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in loader:
            images, labels = batch
            assert images.shape[1:] == (3, 16, 16)
            seen += len(labels)
    assert seen == 4 and ds.num_unreadable == 2
    assert sum("skipping sample" in str(w.message) for w in caught) == 2
