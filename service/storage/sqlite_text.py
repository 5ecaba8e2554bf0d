"""Keyword search of the embedded store: an FTS5 index over the documents' source text.

``document_text_fts`` is an external-content FTS5 table over ``document_sources`` (the
text lives once, in that table); triggers keep it in step in the same transaction as the
document (insert, replace, delete). Ranked by FTS5's BM25 (higher is better as returned
here: ``-bm25``). The index spans every collection; a search joins the matches to the
collection's documents and the filter, so BM25's term statistics are the database's.
"""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS document_text_fts USING fts5(
    text, content='document_sources', content_rowid='row_id');
CREATE TRIGGER IF NOT EXISTS document_sources_fts_insert AFTER INSERT ON document_sources BEGIN
    INSERT INTO document_text_fts (rowid, text) VALUES (new.row_id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS document_sources_fts_delete AFTER DELETE ON document_sources BEGIN
    INSERT INTO document_text_fts (document_text_fts, rowid, text) VALUES ('delete', old.row_id, old.text);
END;
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Create the FTS5 index (filled from the stored texts when the database had none)."""
    existed = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'document_text_fts'"
    ).fetchall()
    conn.executescript(SCHEMA)
    if not existed:
        conn.execute("INSERT INTO document_text_fts (document_text_fts) VALUES ('rebuild')")


def present(conn: sqlite3.Connection) -> bool:
    return bool(
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'document_text_fts'"
        ).fetchall()
    )


def search_sql(where: str) -> str:
    """Row ids and scores of the documents matching ``MATCH ?`` and ``where`` (on ``d``), best first."""
    return (
        "SELECT d.row_id, -bm25(document_text_fts) FROM document_text_fts "
        "JOIN documents AS d ON d.row_id = document_text_fts.rowid "
        f"WHERE document_text_fts MATCH ? AND {where} ORDER BY bm25(document_text_fts) LIMIT ?"
    )
