"""crop_flip: identity without randomness, real shifted windows, flips, determinism."""
import torch
import torch.nn.functional as F

from bknbench.data.augment import crop_flip


def _x(n=16, c=3, h=8, w=8):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_no_pad_no_flip_is_identity():
    x = _x()
    assert torch.equal(crop_flip(x, pad=0, flip=False), x)


def test_no_pad_flip_mirrors_some_samples_and_keeps_others():
    x = _x(n=64)
    y = crop_flip(x, pad=0, generator=torch.Generator().manual_seed(1))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54  # about half of 64


def test_crops_are_shifted_windows_of_the_zero_padded_image():
    pad = 4
    x = _x(n=32)
    y = crop_flip(x, pad=pad, generator=torch.Generator().manual_seed(2))
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    seen = set()
    for n in range(len(x)):
        hits = [(dy, dx, fl) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                for fl in (False, True)
                if torch.equal(y[n], (lambda win: win.flip(-1) if fl else win)(
                    padded[n, :, dy:dy + h, dx:dx + w]))]
        assert hits, f"sample {n} is not a window of its padded image"
        seen.add(hits[0][:2])
    assert len(seen) > 10  # offsets vary across the batch


def test_seeded_generator_is_deterministic_and_shapes_kept():
    x = _x()
    a = crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = crop_flip(x, generator=torch.Generator().manual_seed(3))
    c = crop_flip(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


def test_non_square_and_channels_last():
    x = _x(n=4, c=2, h=6, w=10).to(memory_format=torch.channels_last)
    y = crop_flip(x, pad=0, flip=False)
    assert torch.equal(y, x)
