"""--stream-interval's gathering (gateway.core.HeldBack), step by step: what the integration
test over a live mesh cannot pin, since a gateway that reads a stream late merges its steps."""

from gateway.core import HeldBack


def test_the_first_goes_at_once_then_interval_ids_a_response_and_the_end_at_once():
    held = HeldBack(4)
    assert held.add([7], "a", final=False) == ([7], "a")  # the first token: not held
    for i in range(3):
        assert held.add([i], "b", final=False) is None
    assert held.add([3], "c", final=False) == ([0, 1, 2, 3], "bbbc")
    assert held.add([5], "d", final=False) is None
    assert held.add([6], "e", final=True) == ([5, 6], "de")  # the end: whatever is held


def test_a_late_read_of_several_steps_goes_whole():
    held = HeldBack(4)
    assert held.add([1, 2], "ab", final=False) == ([1, 2], "ab")
    assert held.add([3, 4, 5, 6, 7], "cdefg", final=False) == ([3, 4, 5, 6, 7], "cdefg")
    assert held.add([], "", final=True) == ([], "")  # an end with no new ids still answers


def test_interval_one_sends_each_as_it_comes():
    held = HeldBack(1)
    assert [held.add([i], str(i), final=i == 2) for i in range(3)] == [
        ([0], "0"), ([1], "1"), ([2], "2")]
