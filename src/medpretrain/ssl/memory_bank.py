"""Memory banks (queues of past features) that survive a resume.

MoCo's queue of negative keys (He et al., 2020) and SwAV's queue of past projections (Caron et al., 2020) are
lightly `MemoryBankModule`s. lightly registers a bank's contents and write pointer as non-persistent buffers,
so they are missing from the state_dict: a resumed run would restart from a random queue. `checkpointed_bank`
re-registers the same tensors as persistent buffers, which adds `<bank>.bank` and `<bank>.bank_ptr` to the
state_dict and changes nothing else.
"""

from __future__ import annotations

from lightly.loss.memory_bank import MemoryBankModule


def checkpointed_bank(bank: MemoryBankModule) -> MemoryBankModule:
    """`bank`, with its queue and pointer in the state_dict (modified in place and returned)."""
    bank.register_buffer("bank", bank.bank, persistent=True)
    bank.register_buffer("bank_ptr", bank.bank_ptr, persistent=True)
    return bank


__all__ = ["checkpointed_bank"]
