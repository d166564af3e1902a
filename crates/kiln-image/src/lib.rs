//! Images: a content-addressed OCI image store whose every read is
//! verified, and what moves images in and out of it.
//!
//! Guarantee 1 of kiln lives here: an image is addressed by its digest, every
//! read of a blob is verified against it, and a corrupted or tampered blob is
//! refused with an error naming the digest (see [`store`]).

mod applier;
pub mod build;
pub mod cache;
pub mod config;
pub mod debian;
pub mod digest;
pub mod docker_archive;
pub mod elf;
pub mod error;
pub mod gc;
pub mod gzip;
pub mod image;
pub mod inputs;
pub mod layer;
pub mod layout;
pub mod progress;
pub mod registry;
pub mod rootfs;
pub mod sbom;
pub mod sign;
pub mod store;
pub mod unpack;
pub mod verify;

pub use digest::Digest;
pub use error::ImageError;
pub use image::Image;
pub use store::Store;
