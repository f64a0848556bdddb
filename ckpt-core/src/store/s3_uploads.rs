//! Listing and aborting incomplete S3 multipart uploads (filled by the retention janitor work).
