"""The names every package shares: annotation-table columns, plan columns, score columns with the end
that is good, and the file extensions winnow reads. Tests, reports, sweeps and training read them.
"""
from __future__ import annotations

# ---- column names (a contract: tests, reports and training read them) ----
KEY = "key"
SOURCE = "source"
CAPTION = "caption"
WIDTH = "width"
HEIGHT = "height"
STATUS = "status"
REJECT_REASON = "reject_reason"
DUPLICATE_OF = "duplicate_of"
PHASH = "phash"
PARTITION = "partition"          # input partition = output shard id
STORED_WIDTH = "stored_width"
STORED_HEIGHT = "stored_height"
IMAGE = "image"                  # encoded bytes of the stored (capped) image
IMAGE_EXT = "image_ext"          # "jpg" | "png" | "webp"
RAW = "raw_bytes"                # bytes as read from the source, dropped after decode
CLIP_SIMILARITY = "clip_similarity"
AESTHETIC_SCORE = "aesthetic_score"
OCR_TEXT = "ocr_text"
OCR_AREA_RATIO = "ocr_area_ratio"
CAPTION_COCA = "caption_coca"             # the caption stage's CoCa caption ("" when it made none)
CAPTION_VLM = "caption_vlm"               # a vision-language model's caption of the image or several clip frames
CAPTION_SUMMARY = "caption_summary"       # a language model's merge of the other captions
CAPTION_ISSUE = "caption_issue"           # why generated captions may be poor: 'coca:empty, vlm:max_new_tokens'
CAPTION_COLUMNS = (CAPTION_COCA, CAPTION_VLM, CAPTION_SUMMARY)
IMAGE_EMBEDDING = "clip_image_embedding"   # L2-normalised, one fixed-size vector per row
TEXT_EMBEDDING = "clip_text_embedding"
# clips (video runs): a clip row's IMAGE holds the encoded MP4 (IMAGE_EXT "mp4") and FRAMES its
# first, middle and last frame as JPEGs, which the image model stages score instead of IMAGE
VIDEO_KEY = "video_key"
CLIP_INDEX = "clip_index"
CLIP_START = "start_s"
CLIP_END = "end_s"
FPS = "fps"
NUM_FRAMES = "num_frames"
FRAMES = "frames"
CLIP_FRAMES = 3                  # a clip's first, middle and last frame
MOTION_SCORE = "motion_score"
MOTION_PAIRS = "motion_pairs"    # per sampled frame pair, same unit as motion_score
MOTION_FRAMES = "motion_frames"  # in flight only: the clips stage's 2-fps grey frames for the motion stage
CAMERA_MOTION = "camera_motion"  # the global (affine) part of the flow: pans, tilts, zooms; same unit
SUBJECT_MOTION = "subject_motion"  # the residual: things moving in the scene; same unit
# the camera's move (video.motion.camera_of / CameraMove), named as the camera's: pan_left means the
# camera turns left and the picture moves right
CAMERA_PAN_X = "camera_pan_x"    # % of the frame width per second; > 0: the camera turns right
CAMERA_PAN_Y = "camera_pan_y"    # % of the frame width per second; > 0: the camera tilts up
CAMERA_ZOOM = "camera_zoom"      # % of scale per second (log); > 0: zoom in, the picture grows
CAMERA_ROLL = "camera_roll"      # degrees per second; > 0: the camera rolls clockwise
CAMERA_MOVE = "camera_move"      # static, pan_left, pan_right, tilt_up, tilt_down, zoom_in, zoom_out, complex
CAMERA_COLUMNS = (CAMERA_PAN_X, CAMERA_PAN_Y, CAMERA_ZOOM, CAMERA_ROLL)
FRAME_EMBEDDINGS = "clip_frame_embeddings"   # a clip's frames' image embeddings, concatenated
WINDOW_CUTS = "window_cut_times_s"
# plan columns: where a sample's bytes live (the reader fills them; the first stage reads them)
REF_PATH = "ref_path"            # file to read (image file, or tar holding the sample)
REF_OFFSET = "ref_offset"        # byte offset inside the tar (-1: whole file)
REF_SIZE = "ref_size"
CAPTION_REF = "caption_ref"      # sidecar .txt file path, or "tar:offset:size"
JSON_REF = "json_ref"            # "tar:offset:size" of an img2dataset KEY.json
PLAN_ERROR = "plan_error"        # reason a row is rejected before any bytes are read
SOURCE_RAW = "source_bytes_b64"  # a file name that is not UTF-8: its exact bytes (base64); else null


# file extensions: images (what Pillow reads, with plugins such as pillow-heif), videos, sidecars
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo", ".avif", ".jp2",
                    ".j2k", ".jpx", ".heic", ".heif", ".jxl", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".dds",
                    ".psd", ".pcx", ".sgi", ".qoi", ".jfif", ".pjpeg")
SIDECAR_EXTENSIONS = (".txt", ".json", ".caption")   # NAME.txt / NAME.json beside NAME.jpg: a sidecar
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")


# Lists of numbers travel between stages as JSON text: Ray Data turns a batch of equal-length
# lists into a tensor column, which then cannot merge with a batch of ragged ones. The fragment
# writer stores them as list<double>.
JSON_LIST_COLUMNS = (MOTION_PAIRS, WINDOW_CUTS)
LAION_COLUMNS = ("similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "WIDTH", "HEIGHT")

# Arrow types of the contract columns; other columns keep the type they arrive with.
COLUMN_TYPES = {KEY: "string", SOURCE: "string", CAPTION: "string", STATUS: "string", REJECT_REASON: "string",
                DUPLICATE_OF: "string", PHASH: "string", WIDTH: "int64", HEIGHT: "int64", PARTITION: "int64",
                STORED_WIDTH: "int64", STORED_HEIGHT: "int64", IMAGE_EXT: "string",
                CLIP_SIMILARITY: "double", AESTHETIC_SCORE: "double", OCR_TEXT: "string", OCR_AREA_RATIO: "double",
                CAPTION_COCA: "string", CAPTION_VLM: "string", CAPTION_SUMMARY: "string", CAPTION_ISSUE: "string",
                VIDEO_KEY: "string", CLIP_INDEX: "int64", CLIP_START: "double", CLIP_END: "double", FPS: "double",
                NUM_FRAMES: "int64", MOTION_SCORE: "double", CAMERA_MOTION: "double", SUBJECT_MOTION: "double",
                CAMERA_PAN_X: "double", CAMERA_PAN_Y: "double", CAMERA_ZOOM: "double", CAMERA_ROLL: "double",
                CAMERA_MOVE: "string"}

KEPT = "kept"
REJECTED = "rejected"

# Columns that never go into the annotation table or a sample's JSON. Embeddings go to
# OUTPUT/embeddings/PPPPP.parquet, keyed, so sweeps and later stages reuse them.
EMBEDDING_COLUMNS = (IMAGE_EMBEDDING, TEXT_EMBEDDING, FRAME_EMBEDDINGS)
BULK_COLUMNS = (RAW, IMAGE, FRAMES, MOTION_FRAMES, *EMBEDDING_COLUMNS)
TIMING_PREFIX = "_time_"         # per-row share of a stage's wall time, summed into stats
RSS_PREFIX = "_rss_"             # peak RSS (MB) of the worker that ran a row's stage, max into stats

# Score columns: which end is good. The report draws a histogram of each that is present; a sweep's
# ``keep: auto`` takes the good end from here (winnow's own scores first, then LAION's metadata).
SCORE_GOOD_END = {AESTHETIC_SCORE: "high", CLIP_SIMILARITY: "high", OCR_AREA_RATIO: "low", MOTION_SCORE: "high",
                  SUBJECT_MOTION: "high", CAMERA_MOTION: "high",
                  "AESTHETIC_SCORE": "high", "similarity": "high", "pwatermark": "low", "punsafe": "low"}
