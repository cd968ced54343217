//! Object backends over [`nixl_core::Transport`]: NIXL's OBJ (S3), AZURE_BLOB and DOCA_MEMOS
//! plugins, in static (slot pool) and dynamic (object per key) modes.
#![forbid(unsafe_code)]
