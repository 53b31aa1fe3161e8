"""dataset.py and the drawing helpers of utils.py, on the tiny prepared fixture."""
import numpy as np
import pytest
import torch

from dataset import (Alphabet, BucketBatchSampler, HandwritingDataset, collate, denormalize, load_prepared,
                     make_loader, normalize, padding_fraction, rare_char_copies, read_line_ids)
from utils import offsets_to_strokes, plot_lines


def test_normalize_denormalize_round_trip():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.integers(-300, 300, (50, 2)), rng.integers(0, 2, 50)]).astype(np.float32)
    x0 = x.copy()
    mean, std = np.array([8.3, -0.1], np.float32), np.array([42.4, 37.1], np.float32)
    y = normalize(x, mean, std)
    np.testing.assert_allclose(y[:, :2], (x[:, :2] - mean) / std, rtol=1e-6)
    np.testing.assert_array_equal(y[:, 2], x[:, 2])                          # eos untouched
    np.testing.assert_allclose(denormalize(y, mean, std), x, atol=1e-3)
    t = torch.from_numpy(x.copy()).reshape(5, 10, 3)                         # (B, T, 3) tensors too
    t0 = t.clone()
    y_t = normalize(t, mean, std)
    assert torch.equal(t, t0)                                                 # not modified in place
    back = denormalize(y_t, mean, std)
    assert torch.equal(y_t, normalize(t0, mean, std))
    assert torch.is_tensor(back) and back.shape == t.shape
    torch.testing.assert_close(back, t, atol=1e-3, rtol=0)
    assert torch.equal(normalize(t, mean, std)[..., 2], t[..., 2])
    np.testing.assert_array_equal(x, x0)                                      # inputs not modified in place


def test_alphabet_encode_decode_and_unknown():
    a = Alphabet(" abc")
    assert len(a) == 5 and a.chars == " abc"
    ids = a.encode("cab a")
    assert ids.dtype == torch.long and ids.tolist() == [4, 2, 3, 1, 2]
    assert a.decode(ids) == "cab a" and a.decode([0, 2, 0]) == "a"
    with pytest.raises(ValueError, match=r"characters not in the model's alphabet: 'é', '€'"):
        a.encode("aé€bé")
    assert a.unknown("aé€bé") == ["é", "€"]
    assert a.encode("aé€b", drop_unknown=True).tolist() == [2, 3]


def test_fold_writes_letters_unicode_does_not_decompose_in_plain_forms():
    """NFKD leaves ß, æ, œ, ø, ł, þ as they are; a fraction decomposes to the fraction slash, written '/'."""
    a = Alphabet(" /12AEOSTadehoprstuvz")
    text, forms = a.fold("Straße Æsop œuvre Ørsted Łódź ½ Þór")
    assert text == "Strasse AEsop oeuvre Orsted Łodz 1/2 Thor"   # no 'L' in this alphabet: 'Ł' is left as it is
    assert forms == {"ß": "ss", "Æ": "AE", "œ": "oe", "Ø": "O", "ó": "o", "ź": "z", "½": "1/2", "Þ": "Th"}


def test_dataset_items_and_attributes(tiny_prepared):
    data = load_prepared(tiny_prepared)
    assert load_prepared(tiny_prepared.parent)["line_ids"].tolist() == data["line_ids"].tolist()   # folder works too
    assert isinstance(data["alphabet"], str) and isinstance(data["meta"], dict)
    train = HandwritingDataset(tiny_prepared, "train")
    assert [len(HandwritingDataset(data, s)) for s in ("train", "valid", "test")] == [30, 5, 5]
    strokes, text = train[0]
    assert strokes.dtype == torch.float32 and strokes.shape == (train.lengths[0], 3)
    assert text.dtype == torch.long and train.alphabet.decode(text) == train.texts[0]
    assert set(strokes[:, 2].tolist()) <= {0.0, 1.0} and strokes[-1, 2] == 1     # a line ends with a pen lift
    allx = torch.cat([train[i][0] for i in range(len(train))])
    torch.testing.assert_close(allx[:, :2].mean(0), torch.zeros(2), atol=1e-4, rtol=0)   # train stats: mean 0, std 1
    torch.testing.assert_close(allx[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    raw = denormalize(strokes, train.mean, train.std)[:, :2]
    s = data["line_starts"][np.flatnonzero(data["split"] == 0)[0]]
    np.testing.assert_allclose(raw.numpy(), data["offsets"][s:s + len(raw)], atol=1e-3)
    assert train.mean.dtype == np.float32 and len(train.line_ids) == len(train.texts) == len(train)
    cap = int(np.median(train.lengths))
    short = HandwritingDataset(data, "train", max_points=cap)
    assert len(short) == int(np.sum(train.lengths <= cap)) and short.lengths.max() <= cap   # dropped, not cropped
    assert HandwritingDataset(data, "train", max_lines=3).line_ids == train.line_ids[:3]


def test_listed_lines_are_left_out(tiny_prepared, tmp_path):
    """read_line_ids reads ids one per line (comments, blanks and a byte-order mark ignored); exclude leaves those of
    the split out and counts them; a file of something else is a one-line error."""
    train = HandwritingDataset(tiny_prepared, "train")
    valid = HandwritingDataset(tiny_prepared, "valid")
    listed = tmp_path / "bad.txt"
    listed.write_text(f"\ufeff# lines to leave out\n{train.line_ids[2]}  # -5.1\n\n{train.line_ids[7]}\n"
                      f"{valid.line_ids[0]}\n", encoding="utf-8")
    ids = read_line_ids(listed)
    assert ids == {train.line_ids[2], train.line_ids[7], valid.line_ids[0]}
    kept = HandwritingDataset(tiny_prepared, "train", exclude=ids)
    assert kept.excluded == 2 and kept.line_ids == [i for i in train.line_ids if i not in ids]
    assert kept.texts == [t for i, t in zip(train.line_ids, train.texts) if i not in ids]
    assert HandwritingDataset(tiny_prepared, "valid", exclude=ids).excluded == 1 and train.excluded == 0
    for text in ("", "# nothing\n", "a01-000u-01 a01-000u-02\n"):
        listed.write_text(text)
        with pytest.raises(ValueError, match="must list line ids, one per line"):
            read_line_ids(listed)
    with pytest.raises(FileNotFoundError, match="none.txt not found"):
        read_line_ids(tmp_path / "none.txt")


def test_load_prepared_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run prepare_data.py first"):
        load_prepared(tmp_path / "nope.npz")


def test_a_strokes_file_given_as_prepared_data_says_so(tmp_path):
    from utils import save_strokes
    save_strokes(tmp_path / "lines.npz", [np.zeros((4, 3))], ["ab"])
    with pytest.raises(ValueError, match="is a strokes file .*--data takes the folder prepare_data.py wrote.*recognizer.py read"):
        load_prepared(tmp_path / "lines.npz")


def test_corrupt_prepared_or_strokes_files_are_one_line_errors(tiny_prepared, tmp_path):
    """A cut-short download or copy, a file that is not an npz, and an npz of pickled objects: each a ValueError of
    one line naming the file (the scripts print it), not a zipfile traceback."""
    from utils import load_strokes
    raw = tiny_prepared.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "text.npz").write_text("not an archive")
    np.savez(tmp_path / "objects.npz", offsets=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for name in ("cut", "text", "objects"):
        for load in (load_prepared, load_strokes):
            with pytest.raises(ValueError) as e:
                load(tmp_path / f"{name}.npz")
            assert f"{name}.npz is not a" in str(e.value) and "\n" not in str(e.value), (name, load)
    with pytest.raises(ValueError, match="other.npz is not prepared data"):
        load_prepared(tmp_path / "other.npz")
    np.savez(tmp_path / "old.npz", offsets=np.zeros((3, 2)), eos=np.zeros(3))     # some arrays: another version's
    with pytest.raises(ValueError, match="lacks line_starts, texts, .*made by another version"):
        load_prepared(tmp_path / "old.npz")


def test_collate_pads_and_masks():
    batch = [(torch.ones(4, 3), torch.tensor([1, 2])), (torch.ones(2, 3) * 2, torch.tensor([3, 4, 5]))]
    b = collate(batch)
    assert b["strokes"].shape == (2, 4, 3) and b["text"].shape == (2, 3)
    assert b["stroke_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert b["text_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert (b["strokes"][1, 2:] == 0).all() and b["text"][0, 2] == 0
    assert b["stroke_mask"].dtype == torch.bool and b["text"].dtype == torch.long


def test_bucket_sampler_covers_each_index_once_and_pads_less():
    lengths = np.random.default_rng(1).integers(30, 1800, 2000)
    s = BucketBatchSampler(lengths, 64, shuffle=True, seed=3)
    epoch0 = list(s)
    assert len(epoch0) == len(s) == 32
    assert sorted(i for b in epoch0 for i in b) == list(range(2000))
    assert list(BucketBatchSampler(lengths, 64, shuffle=True, seed=3)) == epoch0   # deterministic
    assert list(BucketBatchSampler(lengths, 64, shuffle=True, seed=4)) != epoch0   # train.py: seed + epoch
    perm = np.random.default_rng(0).permutation(2000)
    random_batches = [perm[i:i + 64] for i in range(0, 2000, 64)]
    assert padding_fraction(lengths, epoch0) < 0.5 * padding_fraction(lengths, random_batches)
    dropped = BucketBatchSampler(lengths, 64, drop_last=True)
    assert len(dropped) == 31 and all(len(b) == 64 for b in dropped)
    ordered = list(BucketBatchSampler(lengths, 64, shuffle=False))
    assert sorted(i for b in ordered for i in b) == list(range(2000))


def test_rare_char_copies_and_a_sampler_that_draws_lines_more_often():
    texts = ["aaa", "ab", "aq", "", "a" * 20]                # counts: a 25, b 1, q 1
    assert rare_char_copies(texts, 4).tolist() == [1, 4, 4, 1, 1]
    assert rare_char_copies(texts, 100).tolist() == [4, 8, 8, 1, 4]      # a: round(100 / 25); b, q: capped at 8
    lengths = np.random.default_rng(1).integers(30, 1800, 500)
    copies = np.random.default_rng(2).integers(1, 4, 500)
    s = BucketBatchSampler(lengths, 16, shuffle=True, seed=3, copies=copies)
    epoch = list(s)
    assert len(epoch) == len(s) == -(-copies.sum() // 16)
    assert np.bincount([i for b in epoch for i in b], minlength=500).tolist() == copies.tolist()
    assert list(BucketBatchSampler(lengths, 16, shuffle=True, seed=3, copies=copies)) == epoch   # deterministic
    perm = np.random.default_rng(0).permutation(np.repeat(np.arange(500), copies))
    assert padding_fraction(lengths, epoch) < 0.5 * padding_fraction(lengths, [perm[i:i + 16] for i in range(0, len(perm), 16)])


def test_make_loader(tiny_prepared):
    ds = HandwritingDataset(tiny_prepared, "train")
    loader = make_loader(ds, 8, shuffle=True, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and sum(len(b["strokes"]) for b in batches) == len(ds)
    b = batches[0]
    assert b["strokes"].shape[:2] == b["stroke_mask"].shape and b["text"].shape == b["text_mask"].shape
    assert (b["stroke_mask"].sum(1) > 0).all()


def test_offsets_to_strokes_and_plot(tmp_path, tiny_prepared):
    offsets = np.array([[0, 0, 0], [1, 1, 1], [5, 0, 0], [1, 0, 1], [2, 2, 1]], dtype=np.float32)
    strokes = offsets_to_strokes(offsets)
    assert [s.tolist() for s in strokes] == [[[0, 0], [1, 1]], [[6, 1], [7, 1]], [[9, 3]]]
    ds = HandwritingDataset(tiny_prepared, "train")
    lines = [(denormalize(ds[i][0], ds.mean, ds.std), ds.texts[i]) for i in range(2)]
    plot_lines(lines, tmp_path / "lines.png")
    assert (tmp_path / "lines.png").read_bytes()[:4] == b"\x89PNG"


def test_augment_scales_and_slants_each_line_in_board_units():
    from dataset import augment
    mean, std = [1.0, -2.0], [3.0, 4.0]
    raw = torch.tensor([[[5.0, 2.0, 0.0], [1.0, -3.0, 1.0], [0.0, 0.0, 0.0]]]).repeat(2, 1, 1)   # (B=2, T=3, 3)
    norm = raw.clone()
    norm[..., 0], norm[..., 1] = (raw[..., 0] - mean[0]) / std[0], (raw[..., 1] - mean[1]) / std[1]
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    norm = norm * mask[..., None]
    out = augment(norm, mask, mean, std, torch.Generator().manual_seed(0), scale=0.2, shear=0.3)
    back_x, back_y = out[..., 0] * std[0] + mean[0], out[..., 1] * std[1] + mean[1]
    drawn = []
    for b in range(2):
        s = back_y[b, 0] / raw[b, 0, 1]                                   # the line's scale
        k = (back_x[b, 0] / s - raw[b, 0, 0]) / raw[b, 0, 1]              # ... and slant
        assert 0.8 <= s <= 1.2 and abs(k) <= 0.3 and abs(s - 1) > 1e-3 and abs(k) > 1e-3   # changed, within bounds
        drawn.append((float(s), float(k)))
        assert torch.allclose(back_x[b, 1], s * (raw[b, 1, 0] + k * raw[b, 1, 1]), atol=1e-5)
        assert torch.allclose(back_y[b, 1], s * raw[b, 1, 1], atol=1e-5)
    assert drawn[0][0] != drawn[1][0] and drawn[0][1] != drawn[1][1]              # each line its own
    assert torch.equal(out[..., 2], norm[..., 2]) and torch.all(out[0, 2] == 0)   # eos kept, padding zero
