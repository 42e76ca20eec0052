"""MessageList (core/conversation.py): copies share one buffer, yet each sees only its own
messages, whatever order they grow, shrink or are replaced in. Checked against plain lists."""
from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from loopstream.core.conversation import Message, MessageList
from loopstream.core.state import clone, fold


def _m(i: int) -> Message:
    return Message(role="user", content=f"m{i}", seq=i)


# an operation: (copy index, kind, value)
ops = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["append", "copy", "set0", "del0", "insert0"]),
                         st.integers(0, 1000)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_copies_behave_as_independent_lists(operations):
    views, models = [MessageList([_m(-1)])], [[_m(-1)]]
    for which, kind, value in operations:
        i = which % len(views)
        view, model = views[i], models[i]
        if kind == "append":
            view.append(_m(value))
            model.append(_m(value))
        elif kind == "copy":
            views.append(view.copy())
            models.append(list(model))
        elif kind == "set0" and model:
            view[0] = _m(value)
            model[0] = _m(value)
        elif kind == "del0" and model:
            del view[0]
            del model[0]
        elif kind == "insert0":
            view.insert(0, _m(value))
            model.insert(0, _m(value))
        for v, m in zip(views, models, strict=True):  # every copy still holds exactly its own
            assert list(v) == m and len(v) == len(m)
            assert v == m
            if m:
                assert v[-1] == m[-1] and v[0] == m[0] and v[1:] == m[1:]


def test_index_out_of_range_is_an_index_error_not_another_copys_message():
    a = MessageList([_m(0)])
    b = a.copy()
    b.append(_m(1))  # the shared buffer now holds two, `a` only one
    try:
        a[1]
    except IndexError:
        pass
    else:
        raise AssertionError("a copy read past its own length")
    assert a[-1] == _m(0) and b[-1] == _m(1)


def test_copies_grown_in_threads_at_once_stay_apart():
    base = MessageList([_m(0)])
    copies = [base.copy() for _ in range(8)]
    start = threading.Barrier(len(copies))

    def grow(k: int) -> None:
        start.wait()
        for j in range(500):
            copies[k].append(_m(k * 1000 + j))

    threads = [threading.Thread(target=grow, args=(k,)) for k in range(len(copies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, c in enumerate(copies):
        assert [m.seq for m in c] == [0] + [k * 1000 + j for j in range(500)]
    assert list(base) == [_m(0)]


def test_a_clone_of_the_state_does_not_see_what_the_original_folds_later():
    state = fold([])
    state.messages.append(_m(0))
    copy = clone(state)
    state.messages.append(_m(1))
    copy.messages.append(_m(2))
    assert [m.seq for m in state.messages] == [0, 1]
    assert [m.seq for m in copy.messages] == [0, 2]
