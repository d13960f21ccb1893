"""The latency/bytes plot stays readable (and cheap) with hundreds of devices."""

from fedclip_edge.broker import report as M


def _records(clients: int, rounds: int) -> list[dict]:
    return [
        {
            "kind": "client",
            "client": f"dev-{i}",
            "round": r,
            "update_latency_s": 0.01 * i,
            "bytes_down": 1000,
            "bytes_up": 1000 + i,
        }
        for r in range(1, rounds + 1)
        for i in range(clients)
    ]


def test_plot_few_and_many_clients(tmp_path):
    assert M.plot(_records(3, 2), tmp_path / "few.png").stat().st_size > 1000
    assert M.plot(_records(200, 3), tmp_path / "many.png").stat().st_size > 1000
    assert M.plot([], tmp_path / "none.png") is None
