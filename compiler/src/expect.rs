//! Expectations for `cnpc test` (issue 13); filled in by the session that builds it.
