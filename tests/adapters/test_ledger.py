"""The forget-request ledger on a real SQLite file: atomic claims, leases, take-over, attempts."""

import threading
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from nhle.adapters.ledger import ForgetRequestRow, LeaseKeeper, Ledger, new_owner, owner_is_gone, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """A fresh ledger database: an SQLite file, or a new database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'requests.db'}"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def ledger(ledger_url):
    return Ledger(ledger_url)


def test_submit_is_committed_and_read_back_by_another_connection(ledger, ledger_url):
    request = ledger.submit(
        [3], ["3"], "alice", "erasure request 12", model_version_before="2", model_name="nhle-classifier"
    )
    again = Ledger(ledger_url).get(request.id)
    assert again == request and again.status == "pending" and again.classes == [3]
    assert again.submitted_at.tzinfo is not None and again.model_version_before == "2"
    assert [r.id for r in ledger.list("pending")] == [request.id] and ledger.list("done") == []


def test_bad_input_is_refused_with_a_message(ledger, tmp_path):
    with pytest.raises(ValueError, match="SQLAlchemy URL"):
        Ledger(str(tmp_path / "requests.db"))
    with pytest.raises(ValueError, match="requester and a reason"):
        ledger.submit([3], ["3"], " ", "why", model_name="nhle-classifier")
    with pytest.raises(ValueError, match="unknown status 'gone'"):
        ledger.list("gone")
    with pytest.raises(KeyError, match="no forget request with id 99"):
        ledger.get(99)
    rejected = ledger.submit(
        [], ["42"], "bob", "typo", status="rejected", error="class 42 is out of range", model_name="nhle-classifier"
    )
    assert rejected.status == "rejected" and rejected.finished_at is not None
    assert ledger.claim(new_owner(), 60) == []  # a rejected request is never processed


def test_many_openers_of_a_new_database_at_once_all_get_a_working_ledger(ledger_url):
    # Servers started side by side each open the ledger: every one must find its tables.
    start, errors, opened = threading.Barrier(6), [], []

    def open_and_submit(n):
        start.wait()
        try:
            opened.append(Ledger(ledger_url).submit([n], [str(n)], "alice", f"r{n}", model_name="nhle-classifier").id)
        except Exception as error:  # noqa: BLE001 - the test reports whatever a racer hit
            errors.append(error)

    threads = [threading.Thread(target=open_and_submit, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.id for r in Ledger(ledger_url).list("pending")) == sorted(opened) and len(opened) == 6


def test_two_runs_claiming_at_once_never_take_the_same_request(ledger, ledger_url):
    ids = {ledger.submit([c % 10], [str(c % 10)], "alice", f"r{c}", model_name="nhle-classifier").id for c in range(30)}
    url = ledger_url
    taken, start = {}, threading.Barrier(3)

    def run(name):
        other = Ledger(url)
        start.wait()
        taken[name] = {r.id for r in other.claim(name, 60)}

    threads = [threading.Thread(target=run, args=(f"host:1:{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = list(taken.values())
    assert set().union(*claimed) == ids
    assert sum(len(c) for c in claimed) == len(ids)  # disjoint
    assert all(r.status == "processing" for r in ledger.list())


def test_a_live_claim_is_kept_and_an_abandoned_one_is_taken_over(ledger, dead_owner):
    live, dead, expired = (ledger.submit([c], [str(c)], "alice", "r", model_name="nhle-classifier") for c in (1, 2, 4))
    me = new_owner()
    assert {r.id for r in ledger.claim(me, 60)} == {live.id, dead.id, expired.id}
    with ledger._session() as session, session.begin():  # hand two of them to gone claimants
        session.get(ForgetRequestRow, dead.id).claimed_by = dead_owner
        row = session.get(ForgetRequestRow, expired.id)
        row.claimed_by, row.lease_until = "other-host:1:x", utcnow() - timedelta(seconds=1)
        session.get(ForgetRequestRow, dead.id).batch = "batch-of-the-dead-run"
    successor = new_owner()
    taken = ledger.claim(successor, 60)
    assert {r.id for r in taken} == {dead.id, expired.id}
    assert next(r for r in taken if r.id == dead.id).batch == "batch-of-the-dead-run"  # kept for recovery
    assert ledger.get(live.id).claimed_by == me
    with pytest.raises(RuntimeError, match="no longer held"):
        ledger.finish(dead.id, me, "done")  # the old claimant cannot close it any more
    assert ledger.finish(dead.id, successor, "done", model_version_after="5").status == "done"


def test_errors_return_requests_to_pending_until_max_attempts(ledger):
    request = ledger.submit([3], ["3"], "alice", "r", model_name="nhle-classifier")
    for attempt in (1, 2):
        owner = new_owner()
        ledger.claim(owner, 60)
        released = ledger.release(request.id, owner, "MLflow unreachable", max_attempts=3)
        assert released.status == "pending" and released.attempts == attempt and released.claimed_by is None
    owner = new_owner()
    ledger.claim(owner, 60)
    failed = ledger.release(request.id, owner, "MLflow unreachable", max_attempts=3)
    assert failed.status == "failed" and failed.attempts == 3 and failed.error == "MLflow unreachable"


def test_lease_keeper_renews_while_the_run_works(ledger):
    request = ledger.submit([3], ["3"], "alice", "r", model_name="nhle-classifier")
    owner = new_owner()
    first = ledger.claim(owner, 0.6)[0].lease_until
    with LeaseKeeper(ledger, owner, 0.6):
        threading.Event().wait(0.9)
        assert ledger.get(request.id).lease_until > first + timedelta(seconds=0.2)
    assert ledger.claim(new_owner(), 60) == []  # renewed and alive: not abandoned


def test_owner_is_gone_only_for_dead_processes_of_this_host(dead_owner):
    assert owner_is_gone(dead_owner)
    assert not owner_is_gone(new_owner())  # this very process
    assert not owner_is_gone("some-other-host:1:x") and not owner_is_gone("garbage")


def test_only_done_requests_delete_classes_and_a_reopen_is_kept_with_who_and_why(ledger, ledger_url):
    owner = new_owner()
    first = ledger.submit([5], ["5"], "dpo@example.com", "erasure 1", model_name="nhle-classifier")
    second = ledger.submit([5, 7], ["5", "7"], "dpo@example.com", "erasure 2", model_name="nhle-classifier")
    pending = ledger.submit([2], ["2"], "dpo@example.com", "erasure 3", model_name="nhle-classifier")
    ledger.claim(owner, 60)
    ledger.finish(first.id, owner, "done", model_version_after="3")
    ledger.finish(second.id, owner, "done", model_version_after="3")
    ledger.release(pending.id, owner, "boom", max_attempts=3)
    assert ledger.deleted_classes("nhle-classifier") == {5: [first.id, second.id], 7: [second.id]}

    with pytest.raises(ValueError, match="needs an operator and a reason"):
        ledger.reopen(first.id, "ops", " ")
    with pytest.raises(ValueError, match="it is pending, not done"):
        ledger.reopen(pending.id, "ops", "why")
    event = ledger.reopen(second.id, "ops@example.com", "court order", {"model_version_to": "2"})
    with pytest.raises(ValueError, match="it is reopened, not done"):
        ledger.reopen(second.id, "ops@example.com", "again")
    assert ledger.deleted_classes("nhle-classifier") == {5: [first.id]}
    again = Ledger(ledger_url)  # another connection reads the same record
    assert again.get(second.id).status == "reopened"
    assert [e.as_dict() for e in again.events(second.id)] == [event.as_dict()]
    assert event.kind == "reopened" and event.detail == {"model_version_to": "2"} and event.at.tzinfo is not None


def test_requester_and_reason_are_bounded_to_what_the_record_keeps(ledger):
    with pytest.raises(ValueError, match="the requester is 5000 characters long; at most 200"):
        ledger.submit([5], ["5"], "x" * 5000, "erasure", model_name="nhle-classifier")
    with pytest.raises(ValueError, match="the reason is 2001 characters long; at most 2000"):
        ledger.submit([5], ["5"], "dpo@example.com", "y" * 2001, model_name="nhle-classifier")
    assert ledger.list() == []
    kept = ledger.submit([5], ["5"], "d" * 200, "line one\nline two", model_name="nhle-classifier")
    assert ledger.get(kept.id).reason == "line one\nline two"  # verbatim


def test_one_ledger_serves_several_models_and_an_old_ledger_keeps_its_deletions(ledger_url):
    """Requests name their registered model: claims, listings and deletions are per model. A
    ledger made before requests named a model gets the column in place, and its rows still count
    as deleted for every model (nothing deleted comes back), pending ones going to the default."""
    Ledger(ledger_url).engine.dispose()
    engine = create_engine(ledger_url)
    with engine.begin() as connection:  # the table as ledgers made before model_name had it
        connection.execute(text("DROP INDEX ix_forget_requests_model_name"))
        connection.execute(text("ALTER TABLE forget_requests DROP COLUMN model_name"))
        connection.execute(
            text(
                "INSERT INTO forget_requests (classes, class_names, requester, reason, status, "
                "submitted_at, attempts) VALUES ('[3]', '[\"3\"]', 'dpo', 'old', 'done', "
                "'2026-01-01 00:00:00', 0), ('[4]', '[\"4\"]', 'dpo', 'old', 'pending', "
                "'2026-01-01 00:00:00', 0)"
            )
        )
    engine.dispose()
    ledger = Ledger(ledger_url)
    assert ledger.get(1).model_name is None and ledger.get(1).classes == [3]
    cats = ledger.submit([5], ["cat"], "dpo", "erasure", model_name="pets")
    assert [r.id for r in ledger.claim(new_owner(), 60, "pets")] == [cats.id]  # not the old pending row
    assert [r.id for r in ledger.claim(new_owner(), 60, "nhle-classifier")] == [2]
    owner = ledger.get(cats.id).claimed_by
    ledger.finish(cats.id, owner, "done", model_version_after="2")
    assert ledger.deleted_classes("pets") == {3: [1], 5: [cats.id]}
    assert ledger.deleted_classes("nhle-classifier") == {3: [1]}
    assert [r.id for r in ledger.list(model_name="pets")] == [1, 2, cats.id]
    with pytest.raises(ValueError, match="names the registered model"):
        ledger.submit([1], ["1"], "dpo", "why", model_name=" ")
