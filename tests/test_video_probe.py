"""Video probing on generated files: sizes, rotation, VFR, audio, and every broken input as a reason."""
import pytest

from pipeline.synth import shot, write_audio_only, write_video
from video.probe import ProbeError, probe


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    frames = shot(20, 96, 64, seed=0, motion=2.0)
    write_video(str(d / "plain.mp4"), frames, fps=10)
    write_video(str(d / "rotated.mp4"), frames, fps=10, rotation=90)
    write_video(str(d / "with_audio.mkv"), frames, fps=10, audio_s=2.0)
    # variable frame rate: 10 fps for 10 frames, then 2 fps
    times = [i * 0.1 for i in range(10)] + [1.0 + i * 0.5 for i in range(10)]
    write_video(str(d / "vfr.mp4"), frames, fps=10, times_s=times)
    write_audio_only(str(d / "audio.m4a"))
    data = (d / "plain.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 50)
    return d


def test_plain_h264(videos):
    info = probe(str(videos / "plain.mp4"))
    assert (info.codec, info.width, info.height, info.num_frames) == ("h264", 96, 64, 20)
    assert (info.fps, info.duration_s, info.rotation, info.variable_frame_rate, info.has_audio) == (
        10.0,
        2.0,
        0,
        False,
        False,
    )
    assert probe((videos / "plain.mp4").read_bytes()).to_dict() == info.to_dict()      # bytes read the same


def test_rotation_swaps_the_display_size(videos):
    info = probe(str(videos / "rotated.mp4"))
    assert abs(info.rotation) == 90 and (info.width, info.height) == (96, 64)
    assert (info.display_width, info.display_height) == (64, 96)


def test_variable_frame_rate_uses_timestamps(videos):
    info = probe(str(videos / "vfr.mp4"))
    assert info.variable_frame_rate and info.num_frames == 20
    assert info.duration_s == pytest.approx(6.0, abs=0.01)          # frames at 0.0 .. 5.5 s, the last lasting 0.5 s
    assert info.fps == pytest.approx(20 / 6.0, abs=0.01)


def test_audio_is_reported(videos):
    assert probe(str(videos / "with_audio.mkv")).has_audio


@pytest.mark.parametrize("name, reason", [
    ("audio.m4a", "no_video_stream: audio-only"),
    ("truncated.mp4", "probe_error: "),
    ("empty.mp4", "probe_error: "),
    ("text.mp4", "probe_error: InvalidDataError"),
    ("missing.mp4", "probe_error: "),
])
def test_broken_inputs_become_reasons(videos, name, reason):
    with pytest.raises(ProbeError) as err:
        probe(str(videos / name))
    assert str(err.value).startswith(reason)
