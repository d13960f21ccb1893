"""Round work: local training on a global adapter and the signed update it produces.

The update's codec (`fedclip_edge.codecs`) decides the frame: fp32/fp16 travel as version-1
frames, delta codecs as version-2 frames against the round's global with their error-feedback
state saved before the update leaves the device (`codec_state.py`), so a restart within a round
re-sends the same bytes instead of applying the residual twice.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import Received
from fedclip_edge.codecs import DELTA_CODECS, ErrorFeedback
from fedclip_edge.config import TrainConfig
from fedclip_edge.device_agent.agent_config import AgentConfig, LocalData, round_generator
from fedclip_edge.device_agent.codec_state import CodecState, global_digest
from fedclip_edge.device_agent.outbox import Outbox
from fedclip_edge.errors import ConfigError
from fedclip_edge.global_codec import state_digest
from fedclip_edge.privacy.accountant import local_epsilon
from fedclip_edge.privacy.dp import apply_delta, delta_of, privatize_delta, secure_generator
from fedclip_edge.train import TrainingStopped, accuracy, train_local
from fedclip_edge.wire import encode_frame, encode_update, expected_shapes


class RoundWork(Outbox):
    """The training half of `Agent` (a mixin: the agent's state lives on the agent; the
    message loop supplies `_superseded`)."""

    cfg: AgentConfig
    data: LocalData
    rejected: Counter[str]
    rounds_trained: int
    _cached: tuple[int, bytes] | None
    _ready_at: float
    _splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    _split_seed: int | None
    _extract_reported: bool
    _codec_state: CodecState | None
    _superseded: Callable[[int], str | None]
    _dp_generator: torch.Generator | None
    _secagg: Any  # device_agent.secagg_device.SecAggDevice, or None
    dp_rounds: int  # rounds counted in the device's epsilon (local DP)
    dp_epsilon: float | None
    stop: threading.Event  # SIGTERM/SIGINT: training ends at its next step boundary

    def _train_and_send(self, g: P.GlobalModel, state: dict[str, torch.Tensor],
                        msg: Received) -> None:
        wait_s = self.clock() - self._ready_at
        if self.cfg.codec in DELTA_CODECS and self._resend_saved(g, state):
            self._ready_at = self.clock()
            return
        if self._splits is None or self._split_seed != g.seed:
            self._splits, self._split_seed = self.data.split(g.seed), g.seed
        splits = self._splits
        try:
            tcfg = TrainConfig.from_untrusted(g.train) if g.train else TrainConfig()
        except ConfigError as exc:
            # refuse, do not guess: training with other settings than the job's would mix
            # incomparable updates; the aggregator's operator sees the line and fixes the job
            self.log(f"error: round {g.round}: global adapter refused, bad training settings "
                     f"from the aggregator: {exc}")
            self.rejected["bad_train_settings"] += 1
            return
        text = self.data.text_features
        adapter = AttentionAdapter(self.data.dim)
        adapter.load_state_dict(state)
        metrics: dict[str, Any] = {
            "global_val_acc": accuracy(adapter, *splits["val"], text),
            "global_test_acc": accuracy(adapter, *splits["test"], text),
        }
        t0 = self.clock()
        try:
            res = train_local(
                adapter, *splits["train"], text, tcfg, logit_scale=self.data.logit_scale,
                generator=round_generator(g.seed, g.round, self.cfg.client_id),
                stop=self.stop,
            )
        except TrainingStopped as exc:  # a part-trained adapter is no round's update
            self.log(f"round {g.round}: stopped after {exc.steps} step(s), not sent")
            return
        train_s = self.clock() - t0
        metrics.update(
            {
                "local_val_acc": accuracy(adapter, *splits["val"], text),
                "local_test_acc": accuracy(adapter, *splits["test"], text),
                "loss": res.loss,
                "steps": res.steps,
                "train_s": train_s,
                "global_wait_s": wait_s,
                "global_transfer_s": msg.transfer_s,
                "bytes_down": msg.wire_bytes,
                "backend": self.data.backend,
                "update_codec": self.cfg.codec,
            }
        )
        if not self._extract_reported:  # once per agent process, with its first update
            metrics["extract_s"] = self.data.extract_s
            metrics["zero_shot_acc"] = accuracy(None, *splits["test"], text)
            self._extract_reported = True
        samples = res.samples if res.samples else int(splits["train"][1].shape[0])
        why = self._superseded(g.round)  # arrived while training: the round is over
        if why is not None:  # before encoding: encoding moves the error-feedback residual on
            self.log(f"round {g.round}: trained but not sent, {why} arrived meanwhile")
            return
        local = adapter.state_dict()
        dp_note = ""
        if self.cfg.dp_clip is not None:
            local, dp_note = self._local_dp(g.round, state, local, metrics)
        if self._secagg is not None:  # the update stays here; a masked sum of it leaves
            self._secagg.trained(g.round, state, local, samples, g.weighting, metrics,
                                 run=g.run)
            self.last_trained = g.round
            self.rounds_trained += 1
            self.log(f"round {g.round} | samples {samples} | loss {res.loss:.4f} | compute "
                     f"{train_s:.3f}s | secure aggregation: keys sent{dp_note}")
            self._ready_at = self.clock()
            return
        payload = self._encode_update(g, state, local, samples, metrics)
        self.last_trained = g.round
        self.rounds_trained += 1
        self._cached = (g.round, payload)
        self._send(g.round, payload)
        upload = "queued" if self._outbox is not None else f"{self.last_upload_s:.3f}s"
        self.log(
            f"round {g.round} | samples {samples} | loss {res.loss:.4f} | compute {train_s:.3f}s"
            f" | wait {wait_s:.3f}s | down {msg.wire_bytes} B | up {self._last_wire} B"
            f" ({self.cfg.codec}) | upload {upload}{dp_note}"
        )
        self._ready_at = self.clock()

    def _local_dp(self, rnd: int, glob: dict[str, torch.Tensor], local: dict[str, torch.Tensor],
                  metrics: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
        """Local DP before anything leaves the device: the delta from the round's global is
        clipped to --dp-clip and noised (std multiplier x clip) from an unpredictable
        generator; the codec then encodes the noised adapter (post-processing keeps the
        guarantee). The device's epsilon assumes it took part in every round up to this one
        (the round number bounds its participations, restarts included) with sampling rate 1:
        it cannot know how often the aggregator picks it."""
        cfg = self.cfg
        assert cfg.dp_clip is not None
        if self._dp_generator is None:
            self._dp_generator = secure_generator()
        noised, _norm = privatize_delta(delta_of(local, glob), cfg.dp_clip,
                                       cfg.dp_noise_multiplier, self._dp_generator)
        self.dp_rounds = max(self.dp_rounds + 1, rnd)
        self.dp_epsilon = local_epsilon(cfg.dp_noise_multiplier, self.dp_rounds, cfg.dp_delta)
        metrics.update({"dp_clip": cfg.dp_clip, "dp_noise_multiplier": cfg.dp_noise_multiplier,
                        "dp_delta": cfg.dp_delta, "dp_rounds": self.dp_rounds})
        # the norm (or whether it was clipped) stays here: it is not covered by the noise
        if math.isfinite(self.dp_epsilon):  # z = 0 (clipping only): no finite epsilon to send
            metrics["dp_epsilon"] = self.dp_epsilon
        note = (f" | local DP clip {cfg.dp_clip:g} z {cfg.dp_noise_multiplier:g}: "
                f"epsilon {self.dp_epsilon:.3g} at delta {cfg.dp_delta:g} "
                f"after {self.dp_rounds} round(s)")
        return apply_delta(glob, noised), note

    def _encode_update(self, g: P.GlobalModel, glob: dict[str, torch.Tensor],
                       local: dict[str, torch.Tensor], samples: int,
                       metrics: dict[str, Any]) -> bytes:
        """The signed update envelope. fp32/fp16 travel as version-1 frames (older aggregators
        read them); delta codecs as version-2 frames against `glob` (the round's global), with
        the error-feedback state saved BEFORE the update leaves the device."""
        codec = self.cfg.codec
        st = self._load_codec_state(local) if codec in DELTA_CODECS else None
        if st is None:
            frame = encode_frame(local, job=self.cfg.job, round=g.round,
                                 client=self.cfg.client_id,
                                 dtype="float16" if codec == "fp16" else "float32")
        else:
            feedback = ErrorFeedback(st.residual)
            frame = encode_update(local, glob, codec=codec, job=self.cfg.job, round=g.round,
                                  client=self.cfg.client_id, feedback=feedback,
                                  topk_fraction=self.cfg.topk_fraction)
            metrics["residual_norm"] = feedback.norm()
        update = P.Update(self.cfg.job, g.round, self.cfg.client_id, samples, metrics, frame,
                          session=self.cfg.session, run=g.run)
        if self.cfg.key is not None:
            update = authn.sign(update, self.cfg.key)
        payload = update.encode()
        if st is not None:
            st.residual, st.round, st.update = feedback.residual, g.round, payload
            # a compressed global: the digest of the global itself, which its dense copy shares
            st.global_sha256 = state_digest(glob) if g.delta else global_digest(g.frame)
            if self.cfg.state_file is not None:
                st.save(self.cfg.state_file)  # before publishing: see codec_state.py
        return payload

    def _load_codec_state(self, shapes_of: dict[str, torch.Tensor]) -> CodecState:
        """The error-feedback state, read from the state file once per process."""
        if self._codec_state is None:
            shapes = expected_shapes(shapes_of)
            if self.cfg.state_file is None:
                self._codec_state = CodecState(self.cfg.job, self.cfg.client_id, self.cfg.codec,
                                               self.data.dim)
            else:
                self._codec_state = CodecState.load(
                    self.cfg.state_file, job=self.cfg.job, client=self.cfg.client_id,
                    codec=self.cfg.codec, shapes=shapes, log=self.log,
                )
                if self._codec_state.round >= 0:
                    self.log(f"error-feedback state {self.cfg.state_file}: residual after round "
                             f"{self._codec_state.round}")
        return self._codec_state

    def _resend_saved(self, g: P.GlobalModel, glob: dict[str, torch.Tensor]) -> bool:
        """After a restart within round g.round: the update saved for it goes again byte for
        byte (its residual is already in the state; encoding again would apply it twice).
        True when nothing is left to train for this round."""
        st = self._load_codec_state(glob)
        if st.round < 0 or st.round < g.round:
            return False
        if (st.round > g.round
                or st.global_sha256 not in (global_digest(g.frame), state_digest(glob))
                or _run_of(st.update) != g.run):
            # the job went back, or this round's global is another one (a new run of the job):
            # that residual belongs to updates this aggregator never had
            self.log(f"warning: error-feedback state of round {st.round} does not match the "
                     f"global of round {g.round}; starting from a zero residual")
            st.residual, st.round, st.update, st.global_sha256 = {}, -1, b"", ""
            return False
        self.last_trained = g.round
        self._cached = (g.round, st.update)
        if self.cfg.client_id in g.have:
            self.log(f"round {g.round}: update saved before a restart; the aggregator has it")
            return True
        self.log(f"round {g.round}: re-sending the update saved before a restart "
                 f"({len(st.update)} B, not encoded again)")
        self._send(g.round, st.update)
        return True


def _run_of(payload: bytes) -> str | None:
    """The run a saved update was signed for (a new run of the job with the same seed has the
    same round-1 global: its update must still not be the old run's bytes)."""
    try:
        header, _ = P.decode_envelope(payload)
    except P.MessageRejected:
        return None
    run = header.get("run", "")
    return run if isinstance(run, str) else None
