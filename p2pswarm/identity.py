"""A peer's identity: an Ed25519 key, stored in libp2p's key format so the same file can later serve as the
p2p daemon's identity, and the libp2p peer id it implies ("12D3KooW...")."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from p2pswarm.errors import UserError

# libp2p crypto.pb: message PrivateKey/PublicKey { KeyType Type = 1; bytes Data = 2; }, Ed25519 = 1.
_PRIV_PREFIX = bytes([0x08, 0x01, 0x12, 0x40])  # Data = 32-byte seed + 32-byte public key
_PUB_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])


class IdentityError(UserError, ValueError):
    pass


def peer_id_from_public(public: bytes) -> str:
    """libp2p peer id of an Ed25519 public key: base58(identity-multihash(protobuf(key)))."""
    encoded = _PUB_PREFIX + public
    return base58.b58encode(bytes([0x00, len(encoded)]) + encoded).decode()


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


class Identity:
    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id = peer_id_from_public(self.public)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """Load the key at `path`, or create it there (mode 0600) on first run."""
        path = Path(path)
        if path.exists():
            data = path.read_bytes()
            if len(data) != len(_PRIV_PREFIX) + 64 or not data.startswith(_PRIV_PREFIX):
                raise IdentityError(f"{path} is not an Ed25519 identity file written by p2pswarm")
            return cls(Ed25519PrivateKey.from_private_bytes(data[len(_PRIV_PREFIX) : len(_PRIV_PREFIX) + 32]))
        ident = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ident.to_bytes())
        try:
            os.link(tmp, path)  # atomic and never overwrites: two nodes starting at once get one key
        except FileExistsError:
            return cls.load_or_create(path)
        finally:
            os.unlink(tmp)
        return ident

    def to_bytes(self) -> bytes:
        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return _PRIV_PREFIX + seed + self.public

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @property
    def name(self) -> str:
        return friendly_name(self.peer_id)


_ADJECTIVES = (
    "agile amber bold brave bright calm clever cosy crisp curious daring deft eager fierce fluffy frisky "
    "gentle giddy glossy graceful hairy hardy humble jolly keen lanky lively lucky mellow mighty nimble "
    "noble patient placid plump proud quick quiet rapid regal robust rough rugged scaly shaggy sharp shiny "
    "silent sleek sly snappy soft solid spry stealthy stocky striped sturdy swift tall tame tawny thorny "
    "tiny tough tricky vivid wild wily wise woolly zealous"
).split()
_ANIMALS = (
    "alpaca ant badger bat bear beaver bee bison boar camel cat cheetah chicken cobra condor crab crane "
    "crow deer dingo dolphin donkey dove duck eagle eel elk emu falcon ferret finch fox frog gazelle gecko "
    "goat goose gorilla hamster hare hawk hedgehog heron hippo horse hyena ibis jackal jaguar kangaroo "
    "koala lemur leopard lion lizard llama lobster lynx macaw mole monkey moose mouse newt octopus okapi "
    "opossum orca ostrich otter owl panda panther parrot pelican penguin pig pigeon puma rabbit raccoon "
    "raven rhino salmon seal shark sheep skunk sloth snail snake sparrow spider squid stork swan tapir "
    "tiger toad trout turkey turtle viper walrus wasp weasel whale wolf wombat yak zebra"
).split()


def friendly_name(peer_id: str) -> str:
    """A stable "adjective-adjective-animal" name for a peer id, as RL Swarm users know them."""
    h = hashlib.sha256(peer_id.encode()).digest()
    a = _ADJECTIVES[int.from_bytes(h[0:4], "big") % len(_ADJECTIVES)]
    b = _ADJECTIVES[int.from_bytes(h[4:8], "big") % len(_ADJECTIVES)]
    c = _ANIMALS[int.from_bytes(h[8:12], "big") % len(_ANIMALS)]
    return f"{a}-{b}-{c}"
