"""Claims keep the deploy servers of one suite apart on one host: a slot number or a uid one
server holds is refused to the other, an abandoned claim is taken over only when nothing of it
is left, and uids taken by two servers from the same place in the range never meet."""

from __future__ import annotations

from pathlib import Path

from services.deploy_kubernetes.backends.local.claims import Claims
from services.deploy_kubernetes.backends.local.uids import Uids


def _pair(tmp_path: Path) -> tuple[Claims, Claims]:
    first, second = Claims(tmp_path / "claims"), Claims(tmp_path / "claims")
    first.prepare()
    return first, second


def test_a_claim_is_one_servers_until_it_releases_it(tmp_path: Path) -> None:
    first, second = _pair(tmp_path)
    assert first.take("slot-3")
    assert first.take("slot-3"), "a holder taking its own claim again keeps it"
    assert not second.take("slot-3")
    assert not second.take("slot-3", unused=lambda: True), "a live holder's claim is never free"
    first.release("slot-3")
    assert not (tmp_path / "claims" / "slot-3").exists()
    assert second.take("slot-3")
    first.release("slot-3")  # not its own: nothing happens
    assert (tmp_path / "claims" / "slot-3").exists()


def test_an_abandoned_claim_is_taken_only_once_nothing_of_it_is_left(tmp_path: Path) -> None:
    first, second = _pair(tmp_path)
    assert first.take("uid-200001")
    first.close()  # its server died: the lock went with it, the file stays
    assert (tmp_path / "claims" / "uid-200001").exists()
    assert not second.take("uid-200001", unused=lambda: False), "its app runs on"
    assert second.take("uid-200001", unused=lambda: True)


def test_abandoned_claims_are_adopted_together(tmp_path: Path) -> None:
    first, second = _pair(tmp_path)
    third = Claims(tmp_path / "claims")
    for name in ("slot-1", "uid-200001"):
        assert first.take(name)
    assert third.take("slot-2")
    first.close()
    assert second.abandoned() == ["slot-1", "uid-200001"]
    assert second.held() == {"slot-1", "uid-200001"}


def test_two_servers_never_hand_out_one_uid(tmp_path: Path) -> None:
    first, second = _pair(tmp_path)
    within = range(200000, 200010)
    # the same offset in the range: without the claims both would begin with the same uid
    a = Uids(within, "suite", claims=first, unused=lambda uid: True)
    b = Uids(within, "suite", claims=second, unused=lambda uid: True)
    taken = [a.take(set()) if n % 2 else b.take(set()) for n in range(10)]
    assert sorted(taken) == list(within)
    a.free(taken[1])
    assert b.take(set()) == taken[1]


def test_a_dead_servers_uid_comes_back_only_when_unused(tmp_path: Path) -> None:
    first, second = _pair(tmp_path)
    within = range(200000, 200002)
    dead = Uids(within, "suite", claims=first)
    gone = dead.take(set())
    first.close()
    running = {gone}
    alive = Uids(within, "suite", claims=second, unused=lambda uid: uid not in running)
    other = alive.take(set())
    assert other != gone
    running.clear()  # its app ended
    assert alive.take(set()) == gone
