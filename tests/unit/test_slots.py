"""The per-namespace cap on attempts in flight: one namespace's burst never blocks another's."""

from __future__ import annotations

import asyncio

from pythontask.slots import NamespaceSlots


async def test_a_full_namespace_waits_and_another_does_not() -> None:
    slots = NamespaceSlots(2)
    held = asyncio.Event()
    release = asyncio.Event()
    entered: list[str] = []

    async def attempt(namespace: str, name: str) -> None:
        async with slots.hold(namespace):
            entered.append(name)
            if len(entered) == 2:
                held.set()
            await release.wait()

    tasks = [asyncio.ensure_future(attempt("busy", f"b{i}")) for i in range(3)]
    await held.wait()
    assert slots.full("busy")
    assert entered == ["b0", "b1"]  # the third waits
    async with asyncio.timeout(1), slots.hold("quiet"):  # another tenant is not held up
        assert not slots.full("quiet")
    release.set()
    await asyncio.gather(*tasks)
    assert entered == ["b0", "b1", "b2"]
    assert not slots.full("busy")
    assert slots._namespaces == {}  # nothing kept for namespaces with nothing in flight


async def test_zero_means_no_cap() -> None:
    slots = NamespaceSlots(0)
    async with slots.hold("a"), slots.hold("a"), slots.hold("a"):
        assert not slots.full("a")
