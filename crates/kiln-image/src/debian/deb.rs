//! Reading `.deb` files (the unpack helper writes this module).
