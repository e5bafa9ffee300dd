"""The history's tables, as schema text both backends take (:func:`mvlm_bench.history.store.ddl` fills ``{pk}``,
``{int}``, ``{real}``); :data:`mvlm_bench.history.database.MIGRATIONS` applies them in order."""

# Schema text shared by both backends: {pk} {int} {real} are filled per backend (store.ddl). Version 1 is the
# layout of the first release (SQLite only, versioned by PRAGMA user_version); NEVER edit a released step.
SCHEMA_V1 = """
CREATE TABLE entry (
    id {pk},
    created_at TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    project_commit TEXT NOT NULL DEFAULT '',
    project_dirty {int},
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    precision TEXT NOT NULL DEFAULT '',
    model_file TEXT NOT NULL DEFAULT '',
    model_sha256 TEXT NOT NULL DEFAULT '',
    mmproj_file TEXT NOT NULL DEFAULT '',
    mmproj_sha256 TEXT NOT NULL DEFAULT '',
    size_bytes {int},
    runtime_commit TEXT NOT NULL DEFAULT '',
    runtime_patches TEXT NOT NULL DEFAULT '[]',
    protocol TEXT NOT NULL DEFAULT '',
    cpu_info TEXT NOT NULL DEFAULT '',
    gpu_info TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL DEFAULT '{}',
    repetitions {int} NOT NULL
);
CREATE INDEX entry_setup ON entry (device, model_sha256, protocol);
CREATE TABLE repetition (
    entry_id {int} NOT NULL REFERENCES entry(id) ON DELETE CASCADE,
    idx {int} NOT NULL,
    timing TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (entry_id, idx)
);
CREATE TABLE sample (
    entry_id {int} NOT NULL REFERENCES entry(id) ON DELETE CASCADE,
    repetition {int} NOT NULL,
    metric TEXT NOT NULL,
    value {real},
    PRIMARY KEY (entry_id, repetition, metric)
);
"""

SCHEMA_V2 = """
CREATE TABLE schema_version (
    version {int} PRIMARY KEY,
    applied_at TEXT NOT NULL
)
"""
