"""Secret noise: DP noise that whoever holds the run config cannot regenerate (``privacy.secure_noise``).

In simulation one seed fixes everything: every client's DP-SGD noise and Poisson batch draws
come from ``derive_seed(seed, round, partition, "train")`` and the central noise from
``derive_seed(seed, round, "user-dp")``. The seed travels in the run config, so under a
deployment an honest-but-curious server (it sends that config) could regenerate each
client's noise and subtract it from the client's update: DP-SGD would protect nothing
against the one party it is meant to protect against. With ``secure_noise = "on"`` the
generators that draw noise and Poisson masks get their state from the operating system's
CSPRNG (`secrets`, i.e. ``os.urandom``), never from the config.

Why a whole generator state and not a 64-bit seed: torch's CPU generator (MT19937) keeps
only the low 32 bits of ``manual_seed`` (``manual_seed(5)`` and ``manual_seed(2**40 + 5)``
draw the same numbers; `tests/privacy/test_secure_noise.py` checks it), and 2^32 candidate
seeds are an afternoon's search for a server that wants the noise. So on a CPU the 624
words of MT19937's state are filled from SHAKE-256 of a 256-bit secret key
(`keyed_generator`), written through ``Generator.set_state``; on a GPU, Philox takes a
64-bit key, which is used whole. Neither generator is cryptographic (Opacus' ``secure_mode``
uses torchcsprng, which cannot be installed here): the secret is the state, not the
algorithm that expands it.

``auto`` (the default) is ``on`` under a deployment (`fedsim deploy`, `flwr run` on a real
SuperLink) and ``off`` in simulation, where reproducibility is the point
(`resolve_secure_noise`). A deployment writes ``on`` into the experiment it sends the nodes
(`fedsim.run.prepare`); a simulation leaves ``auto`` in its config, which reads as off
(`is_secret`), so a simulation's config.toml and its sweep records stay as they were.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import secrets
import sys
import warnings
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError

MODES = ("auto", "on", "off")

# torch's CPUGeneratorImplState (aten/src/ATen/CPUGeneratorImpl.cpp): the legacy THGeneratorState
# (the_initial_seed u64, left i32, seeded i32, next u64, state[624] u64, three doubles, an int),
# then a float and a bool, padded: 5056 bytes. Only state[] decides the draws once `left` is 1,
# which manual_seed leaves it at: the first draw twists the whole state.
_MT_WORDS = 624
_MT_OFFSET = 24
_CPU_STATE_BYTES = 5056
KEY_BYTES = 32  # 256-bit keys: no search over keys is cheaper than over the state itself


def resolve_secure_noise(mode: str, *, deployment: bool) -> str:
    """``on`` or ``off``: ``auto`` is on under a deployment, off in simulation."""
    if mode not in MODES:
        raise ConfigError(f"privacy.secure_noise: must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "auto":
        return "on" if deployment else "off"
    return mode


def is_secret(mode: str) -> bool:
    """Whether a run's noise is secret, from its ``privacy.secure_noise``: only a deployment
    rewrites ``auto`` (to ``on``, `fedsim.run.prepare`), so an ``auto`` that reaches a client or
    the server's layer is a simulation's, which is off."""
    return mode == "on"


def secret_key() -> bytes:
    """A fresh 256-bit key from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _stream(key: bytes, parts: tuple) -> hashlib._Hash:
    return hashlib.shake_256(key + b"\x00" + "/".join(map(str, parts)).encode())


def _set_mt_state(generator: torch.Generator, words: np.ndarray) -> None:
    """Replace a CPU generator's MT19937 state by `words` (624 uint32)."""
    if sys.byteorder != "little":
        raise RuntimeError("privacy.secure_noise: setting torch's CPU generator state assumes a little-endian host")
    generator.manual_seed(0)  # left = 1, next = 0, no cached normal: the next draw twists `words`
    state = generator.get_state().numpy().copy()
    if state.size != _CPU_STATE_BYTES:
        raise RuntimeError(f"privacy.secure_noise: torch's CPU generator state is {state.size} bytes, not the "
                           f"{_CPU_STATE_BYTES} this torch version was checked with; refusing to fall back to a "
                           f"32-bit seed")
    state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS].view("<u8")[:] = words.astype(np.uint64)
    generator.set_state(torch.from_numpy(state))
    if not np.array_equal(generator.get_state().numpy(), state):  # the layout is what this module assumes
        raise RuntimeError("privacy.secure_noise: torch did not keep the generator state it was given")


def keyed_generator(key: bytes, *parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on `device` whose whole state comes from (`key`, `parts`): on a CPU all of
    MT19937's 19,968 bits of state from SHAKE-256, on a GPU Philox's 64-bit key. The same key and
    parts give the same draws (a run's tree noise is drawn again each round it is needed); without
    the key nothing about them can be computed."""
    stream = _stream(key, parts)
    device = torch.device(device)
    if device.type == "cpu":
        generator = torch.Generator()
        _set_mt_state(generator, np.frombuffer(stream.digest(4 * _MT_WORDS), dtype="<u4"))
        return generator
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(stream.digest(8), "little"))
    return generator


def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from the OS CSPRNG alone (a fresh key each call)."""
    return keyed_generator(secret_key(), device=device)


def secret_seed_everything(device: str) -> None:
    """`fedsim.algorithms.seed_everything` from the OS CSPRNG: torch's default CPU generator (what
    Opacus draws its noise and Poisson masks from when it is given no generator) gets a secret
    MT19937 state, and the CUDA one a secret 64-bit key when training there."""
    stream = _stream(secret_key(), ("default",))
    _set_mt_state(torch.default_generator, np.frombuffer(stream.digest(4 * _MT_WORDS), dtype="<u4"))
    if device.startswith("cuda"):
        torch.cuda.manual_seed(int.from_bytes(secrets.token_bytes(8), "little"))


def fp_safe_standard_normal(shape: tuple[int, ...], *, generator: torch.Generator,
                            device: str | torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """N(0, 1) as the sum of four draws halved, as Opacus' ``secure_mode`` draws DP-SGD noise
    (`opacus.optimizers.optimizer._generate_noise`): Holohan and Braghin, "Secure Random Sampling
    in Differential Privacy" (ESORICS 2021), section 5.1, against the floating-point attacks on
    Gaussian noise (Jin et al., "Are We There Yet? Timing and Floating-Point Attacks on
    Differential Privacy Systems", S&P 2022). Like Opacus, one throw-away draw first."""
    torch.randn((1, 1), generator=generator, device=device)
    draws = torch.randn((4, *shape), generator=generator, device=device)
    out = torch.sum(draws, 0, out=out)
    return out.div_(2.0)


STATEMENTS = {
    "off": ("Secure RNG turned off (privacy.secure_noise = off): every client's DP-SGD noise and Poisson batch "
            "draws, and the server's central noise, come from generators seeded by the experiment seed, which "
            "the run config carries; whoever holds that config, the server included, can regenerate that noise "
            "and subtract it. Right for simulation (one seed reproduces the run), not for a deployment on real "
            "data: there use privacy.secure_noise = on, or auto (docs/privacy.md)."),
    "on": ("Secure noise on (privacy.secure_noise = on): DP-SGD noise and Poisson batch draws (per client and "
           "round) and the central noise (per run) come from generator states drawn from the OS CSPRNG "
           "(os.urandom), never from the run config, so no one can regenerate them from it; the generators that "
           "expand those states (torch's MT19937 on a CPU, Philox on a GPU) are not cryptographic, as Opacus' "
           "secure_mode with torchcsprng would be. Still derived from the seed and known to whoever holds it: "
           "which clients train each round, the data partition, the initial model, audit canaries, label-DP "
           "(bags) noise. This run is not reproducible."),
}
_ANNOUNCED: set[str] = set()
# One flag per statement, shared by processes that together are one run for their user (a
# sweep's workers, `share_announcements`); None in a process on its own.
_SHARED: Any = None


def shared_record(context: Any = multiprocessing) -> Any:
    """A record of the statements made, for processes of ``context`` (a multiprocessing context)
    to share through `share_announcements`: one byte per statement, under one lock."""
    return context.Array("b", len(STATEMENTS))


def share_announcements(record: Any) -> None:
    """Make `announce` once per group of processes, not per process: a sweep hands its workers
    one `shared_record`, so its users read each statement once per sweep, not once per
    worker. The first process to make a statement sets its flag; the others stay silent."""
    global _SHARED
    _SHARED = record


def announce(mode: str) -> None:
    """Say once per process (or per group, `share_announcements`) what the noise of this mode
    does and does not hide (the engines and the central-DP layer call it wherever they draw
    noise; Python's own "once" forgets at every ``warnings.catch_warnings``, so this module
    keeps its own record)."""
    if mode in _ANNOUNCED:
        return
    _ANNOUNCED.add(mode)
    if _SHARED is not None:
        index = list(STATEMENTS).index(mode)
        with _SHARED.get_lock():
            said = _SHARED[index]
            _SHARED[index] = 1
        if said:
            return
    warnings.warn(STATEMENTS[mode], UserWarning, stacklevel=3)
