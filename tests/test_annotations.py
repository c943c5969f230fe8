import json

import pytest

from conftest import DATA
from fathompipe.annotations import AnnotationError, load_coco


def test_real_test_split_loads_unlabelled():
    ds = load_coco(DATA / "dataset_test.json")
    assert (len(ds.images), len(ds.annotations), len(ds.categories)) == (325, 788, 79)
    assert not ds.labelled
    assert ds.class_names()[0] == "Abyssocucumis abyssorum"


def _mutated(tmp_path, mutate):
    raw = json.loads((DATA / "dataset_test.json").read_text())
    mutate(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("mutate, words", [
    (lambda r: r["annotations"].append(dict(r["annotations"][0])), ["annotations[id=1]", "duplicate"]),
    (lambda r: r["images"].append(dict(r["images"][0], file_name="x.png")), ["images[id=1]", "duplicate"]),
    (lambda r: r["annotations"][3].update(image_id=99999), ["annotations[id=4]", "image_id 99999"]),
    (lambda r: r["annotations"][3].update(category_id=500), ["annotations[id=4]", "category_id 500"]),
    (lambda r: r["annotations"][5].update(bbox=[1, 2, 0, 5]), ["annotations[id=6]", "positive"]),
    (lambda r: r["annotations"][5].update(bbox=[1, 2, float("nan"), 5]), ["annotations[id=6]", "non-finite"]),
    (lambda r: r["annotations"][5].update(bbox=[1, 2, 3]), ["annotations[id=6]", "bbox"]),
    (lambda r: r["images"][2].update(file_name="../etc/passwd"), ["images[id=3]", "'../etc/passwd'"]),
    (lambda r: r["images"][2].update(file_name="/abs/x.png"), ["images[id=3]", "plain file name"]),
    (lambda r: r["images"][2].update(coco_url="file:///etc/passwd"), ["images[id=3]", "coco_url", "file:///etc/passwd"]),
    (lambda r: r["images"][2].update(width=-5), ["images[id=3]", "positive"]),
    (lambda r: r.pop("categories"), ["categories", "missing"]),
])
def test_problems_name_file_field_id_and_value(tmp_path, mutate, words):
    path = _mutated(tmp_path, mutate)
    with pytest.raises(AnnotationError) as exc:
        load_coco(path)
    assert str(path) in str(exc.value)
    for word in words:
        assert word in str(exc.value)


def test_not_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        load_coco(p)


def test_shards_partition_and_are_stable(tmp_path):
    ds = load_coco(DATA / "dataset_test.json")
    shards = [ds.shard(i, 7) for i in range(7)]
    ids = [im.id for s in shards for im in s]
    assert sorted(ids) == ds.images.id.tolist() and len(ids) == len(set(ids))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # stable: a function of the id set alone, whatever the order of images in the file
    raw = json.loads((DATA / "dataset_test.json").read_text())
    raw["images"].reverse()
    shuffled = tmp_path / "reversed.json"
    shuffled.write_text(json.dumps(raw))
    assert [im.id for im in load_coco(shuffled).shard(3, 7)] == [im.id for im in shards[3]]


def test_train_sized_file_validates(tmp_path):
    from support.synthetic import train_like_coco
    path = train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json", tmp_path / "train.json")
    ds = load_coco(path)
    # 8,981 train images, of which 8,980 carry annotations (the labels CSV lists only those)
    assert len(ds.annotations) == 23699 and len(ds.images) == 8980 and ds.labelled
