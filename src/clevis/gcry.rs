//! P-521 arithmetic and ECDSA verification through libgcrypt, which the static
//! binary already links (libcryptsetup's crypto backend): the RustCrypto
//! `p521`/`ecdsa` crates added about 200 KiB of curve code to a binary that must
//! stay within 6 MiB, for operations libgcrypt already carries.
//!
//! Every handle is owned by a guard that releases it on every path; points cross
//! this boundary as big-endian affine coordinates, checked on the curve on the
//! way in. Scalars are held in libgcrypt MPIs only for the call and released.

use super::ClevisError;
use crate::secret::SecretBytes;
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::sync::Once;

pub const COORD: usize = 66;
const CURVE: &std::ffi::CStr = c"NIST P-521";
const GCRYCTL_DISABLE_SECMEM: c_int = 37;
const GCRYCTL_INITIALIZATION_FINISHED: c_int = 38;
const GCRYCTL_INITIALIZATION_FINISHED_P: c_int = 39;
const GCRYMPI_FMT_USG: c_int = 5;

type Ptr = *mut c_void;

extern "C" {
    fn gcry_check_version(req: *const c_char) -> *const c_char;
    fn gcry_control(cmd: c_int, ...) -> c_uint;
    fn gcry_mpi_scan(r: *mut Ptr, fmt: c_int, buf: *const u8, len: usize, n: *mut usize) -> c_uint;
    fn gcry_mpi_print(fmt: c_int, buf: *mut u8, size: usize, n: *mut usize, a: Ptr) -> c_uint;
    fn gcry_mpi_new(nbits: c_uint) -> Ptr;
    fn gcry_mpi_release(a: Ptr);
    fn gcry_mpi_set_ui(w: Ptr, u: std::os::raw::c_ulong) -> Ptr;
    fn gcry_mpi_point_new(nbits: c_uint) -> Ptr;
    fn gcry_mpi_point_release(p: Ptr);
    fn gcry_mpi_point_set(p: Ptr, x: Ptr, y: Ptr, z: Ptr) -> Ptr;
    fn gcry_mpi_ec_new(ctx: *mut Ptr, keyparam: Ptr, curve: *const c_char) -> c_uint;
    fn gcry_ctx_release(ctx: Ptr);
    fn gcry_mpi_ec_get_point(name: *const c_char, ctx: Ptr, copy: c_int) -> Ptr;
    fn gcry_mpi_ec_get_mpi(name: *const c_char, ctx: Ptr, copy: c_int) -> Ptr;
    fn gcry_mpi_ec_get_affine(x: Ptr, y: Ptr, p: Ptr, ctx: Ptr) -> c_int;
    fn gcry_mpi_ec_add(w: Ptr, u: Ptr, v: Ptr, ctx: Ptr);
    fn gcry_mpi_sub(w: Ptr, u: Ptr, v: Ptr);
    fn gcry_mpi_ec_mul(w: Ptr, n: Ptr, u: Ptr, ctx: Ptr);
    fn gcry_mpi_ec_curve_point(w: Ptr, ctx: Ptr) -> c_int;
    fn gcry_mpi_cmp(u: Ptr, v: Ptr) -> c_int;
    fn gcry_mpi_cmp_ui(u: Ptr, v: std::os::raw::c_ulong) -> c_int;
    fn gcry_sexp_build(r: *mut Ptr, erroff: *mut usize, fmt: *const c_char, ...) -> c_uint;
    fn gcry_sexp_release(s: Ptr);
    fn gcry_pk_verify(sig: Ptr, data: Ptr, pkey: Ptr) -> c_uint;
    fn gcry_mpi_addm(w: Ptr, u: Ptr, v: Ptr, m: Ptr);
    fn gcry_mpi_subm(w: Ptr, u: Ptr, v: Ptr, m: Ptr);
    fn gcry_mpi_mulm(w: Ptr, u: Ptr, v: Ptr, m: Ptr);
    fn gcry_mpi_invm(x: Ptr, a: Ptr, m: Ptr) -> c_int;
    fn gcry_cipher_open(h: *mut Ptr, algo: c_int, mode: c_int, flags: c_uint) -> c_uint;
    fn gcry_cipher_close(h: Ptr);
    fn gcry_cipher_setkey(h: Ptr, key: *const u8, len: usize) -> c_uint;
    fn gcry_cipher_setiv(h: Ptr, iv: *const u8, len: usize) -> c_uint;
    fn gcry_cipher_authenticate(h: Ptr, a: *const u8, len: usize) -> c_uint;
    fn gcry_cipher_encrypt(
        h: Ptr,
        out: *mut u8,
        outlen: usize,
        inp: *const u8,
        inlen: usize,
    ) -> c_uint;
    fn gcry_cipher_decrypt(
        h: Ptr,
        out: *mut u8,
        outlen: usize,
        inp: *const u8,
        inlen: usize,
    ) -> c_uint;
    fn gcry_cipher_gettag(h: Ptr, tag: *mut u8, len: usize) -> c_uint;
    fn gcry_cipher_checktag(h: Ptr, tag: *const u8, len: usize) -> c_uint;
}

const GCRY_CIPHER_AES256: c_int = 9;
const GCRY_CIPHER_MODE_GCM: c_int = 9;

/// AES-256-GCM in place. Encrypting fills `tag`; decrypting checks it and
/// returns false (with `buf` wiped) when it does not match.
pub fn aes256gcm(
    encrypt: bool,
    key: &[u8],
    iv: &[u8],
    aad: &[u8],
    buf: &mut [u8],
    tag: &mut [u8; 16],
) -> Result<bool, ClevisError> {
    if key.len() != 32 || iv.len() != 12 {
        return Err(ClevisError::Crypto(
            "A256GCM needs a 32-byte key and 12-byte iv".into(),
        ));
    }
    init();
    let mut h = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the handle is closed below on every path.
    if unsafe { gcry_cipher_open(&mut h, GCRY_CIPHER_AES256, GCRY_CIPHER_MODE_GCM, 0) } != 0
        || h.is_null()
    {
        return Err(ClevisError::Crypto("libgcrypt has no AES-256-GCM".into()));
    }
    // SAFETY: every buffer is valid for the length given; in-place operation is
    // requested by a NULL input of length 0, as libgcrypt documents.
    let r = unsafe {
        if gcry_cipher_setkey(h, key.as_ptr(), key.len()) != 0
            || gcry_cipher_setiv(h, iv.as_ptr(), iv.len()) != 0
            || gcry_cipher_authenticate(h, aad.as_ptr(), aad.len()) != 0
        {
            Err(ClevisError::Crypto("A256GCM setup failed".into()))
        } else if encrypt {
            if gcry_cipher_encrypt(h, buf.as_mut_ptr(), buf.len(), std::ptr::null(), 0) != 0
                || gcry_cipher_gettag(h, tag.as_mut_ptr(), 16) != 0
            {
                Err(ClevisError::Crypto("A256GCM encryption failed".into()))
            } else {
                Ok(true)
            }
        } else if gcry_cipher_decrypt(h, buf.as_mut_ptr(), buf.len(), std::ptr::null(), 0) != 0 {
            Err(ClevisError::Crypto("A256GCM decryption failed".into()))
        } else {
            Ok(gcry_cipher_checktag(h, tag.as_ptr(), 16) == 0)
        }
    };
    // SAFETY: opened above, closed once.
    unsafe { gcry_cipher_close(h) };
    if matches!(r, Ok(false)) {
        zeroize::Zeroize::zeroize(buf);
    }
    r
}

/// libgcrypt must be initialised once per process; libcryptsetup does the same
/// when it runs first (it checks whether initialisation is finished).
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: documented initialisation sequence; the calls take no pointers
        // except the NULL version requirement.
        unsafe {
            if gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P) == 0 {
                gcry_check_version(std::ptr::null());
                gcry_control(GCRYCTL_DISABLE_SECMEM, 0 as c_int);
                gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0 as c_int);
            }
        }
    });
}

/// A P-521 point, known to be on the curve (not the identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub x: Vec<u8>,
    pub y: Vec<u8>,
}

fn oom() -> ClevisError {
    ClevisError::Crypto("libgcrypt could not allocate".into())
}

/// The curve context and everything made in it, released together.
struct Ctx {
    ctx: Ptr,
    mpis: Mpis,
    points: Vec<Ptr>,
}

impl Ctx {
    fn new() -> Result<Ctx, ClevisError> {
        init();
        let mut ctx = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the curve name is NUL-terminated.
        let err = unsafe { gcry_mpi_ec_new(&mut ctx, std::ptr::null_mut(), CURVE.as_ptr()) };
        if err != 0 || ctx.is_null() {
            return Err(ClevisError::Crypto(
                "libgcrypt has no curve NIST P-521".into(),
            ));
        }
        Ok(Ctx {
            ctx,
            mpis: Mpis(Vec::new()),
            points: Vec::new(),
        })
    }

    fn mpi(&mut self, bytes: &[u8]) -> Result<Ptr, ClevisError> {
        self.mpis.scan(bytes)
    }

    fn empty_mpi(&mut self) -> Result<Ptr, ClevisError> {
        self.mpis.new_mpi()
    }

    fn point(&mut self) -> Result<Ptr, ClevisError> {
        // SAFETY: constructor; released in Drop.
        let p = unsafe { gcry_mpi_point_new(0) };
        if p.is_null() {
            return Err(oom());
        }
        self.points.push(p);
        Ok(p)
    }

    fn load(&mut self, pt: &Point) -> Result<Ptr, ClevisError> {
        let (x, y) = (self.mpi(&pt.x)?, self.mpi(&pt.y)?);
        let z = self.empty_mpi()?;
        let p = self.point()?;
        // SAFETY: live MPIs and point; point_set copies the values.
        let on = unsafe {
            gcry_mpi_set_ui(z, 1);
            gcry_mpi_point_set(p, x, y, z);
            gcry_mpi_ec_curve_point(p, self.ctx)
        };
        if on != 1 {
            return Err(ClevisError::Crypto(
                "an EC point is not on curve P-521".into(),
            ));
        }
        Ok(p)
    }

    fn store(&mut self, p: Ptr) -> Result<Point, ClevisError> {
        let (x, y) = (self.empty_mpi()?, self.empty_mpi()?);
        // SAFETY: live objects of this context.
        if unsafe { gcry_mpi_ec_get_affine(x, y, p, self.ctx) } != 0 {
            return Err(ClevisError::Crypto("the point at infinity".into()));
        }
        Ok(Point {
            x: self.bytes(x)?,
            y: self.bytes(y)?,
        })
    }

    /// An MPI as COORD big-endian bytes.
    fn bytes(&self, m: Ptr) -> Result<Vec<u8>, ClevisError> {
        let mut buf = vec![0u8; COORD];
        let mut n = 0usize;
        // SAFETY: the buffer is COORD bytes; libgcrypt writes at most that and
        // reports how many.
        let err = unsafe { gcry_mpi_print(GCRYMPI_FMT_USG, buf.as_mut_ptr(), COORD, &mut n, m) };
        if err != 0 || n > COORD {
            return Err(ClevisError::Crypto("libgcrypt MPI encoding failed".into()));
        }
        buf.rotate_right(COORD - n);
        Ok(buf)
    }

    fn generator(&mut self) -> Result<Ptr, ClevisError> {
        // SAFETY: a copy of the curve's generator, released in Drop.
        let g = unsafe { gcry_mpi_ec_get_point(c"g".as_ptr(), self.ctx, 1) };
        if g.is_null() {
            return Err(oom());
        }
        self.points.push(g);
        Ok(g)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: each handle was made by this context and is released once.
        unsafe {
            for p in self.points.drain(..) {
                gcry_mpi_point_release(p);
            }
            // The MPIs go before the context, as they always have.
            drop(std::mem::replace(&mut self.mpis, Mpis(Vec::new())));
            gcry_ctx_release(self.ctx);
        }
    }
}

/// Check that (x, y) is on P-521.
pub fn point(x: &[u8], y: &[u8]) -> Result<Point, ClevisError> {
    if x.len() != COORD || y.len() != COORD {
        return Err(ClevisError::Malformed(format!(
            "EC point coordinates of {}/{} bytes, P-521 needs {COORD}",
            x.len(),
            y.len()
        )));
    }
    let pt = Point {
        x: x.to_vec(),
        y: y.to_vec(),
    };
    Ctx::new()?.load(&pt)?;
    Ok(pt)
}

/// A uniformly random scalar in [1, n), 66 bytes big-endian, from the kernel.
pub fn random_scalar() -> Result<SecretBytes, ClevisError> {
    let mut c = Ctx::new()?;
    // SAFETY: a copy of the curve order, released by the context... kept in mpis.
    let n = unsafe { gcry_mpi_ec_get_mpi(c"n".as_ptr(), c.ctx, 1) };
    if n.is_null() {
        return Err(oom());
    }
    c.mpis.0.push(n);
    for _ in 0..256 {
        let mut b = SecretBytes::zeroed(COORD);
        crate::secret::fill_random(b.as_mut_bytes())
            .map_err(|e| ClevisError::Crypto(format!("no randomness: {e}")))?;
        b.as_mut_bytes()[0] &= 0x01;
        let v = c.mpi(b.as_bytes())?;
        // SAFETY: both MPIs are live.
        if unsafe { gcry_mpi_cmp_ui(v, 0) != 0 && gcry_mpi_cmp(v, n) < 0 } {
            return Ok(b);
        }
    }
    Err(ClevisError::Crypto("no usable random scalar".into()))
}

/// The operations the Tang exchange needs.
pub enum Op<'a> {
    /// e·G
    MulBase(&'a [u8]),
    /// e·P
    Mul(&'a Point, &'a [u8]),
    /// P + e·G
    AddMulBase(&'a Point, &'a [u8]),
    /// P − e·Q
    SubMul(&'a Point, &'a Point, &'a [u8]),
}

pub fn compute(op: Op<'_>) -> Result<Point, ClevisError> {
    let mut c = Ctx::new()?;
    let r = c.point()?;
    match op {
        Op::MulBase(e) => {
            let (e, g) = (c.mpi(e)?, c.generator()?);
            // SAFETY: live objects of this context.
            unsafe { gcry_mpi_ec_mul(r, e, g, c.ctx) };
        }
        Op::Mul(p, e) => {
            let (p, e) = (c.load(p)?, c.mpi(e)?);
            // SAFETY: as above.
            unsafe { gcry_mpi_ec_mul(r, e, p, c.ctx) };
        }
        Op::AddMulBase(p, e) => {
            let (p, e, g) = (c.load(p)?, c.mpi(e)?, c.generator()?);
            let t = c.point()?;
            // SAFETY: as above: t = e·G, r = P + t.
            unsafe {
                gcry_mpi_ec_mul(t, e, g, c.ctx);
                gcry_mpi_ec_add(r, p, t, c.ctx);
            }
        }
        Op::SubMul(p, q, e) => {
            // libgcrypt has no subtraction on Weierstrass curves (it aborts):
            // P − t = P + (x_t, p − y_t).
            let (p, q, e) = (c.load(p)?, c.load(q)?, c.mpi(e)?);
            let t = c.point()?;
            // SAFETY: as above: t = e·Q.
            unsafe { gcry_mpi_ec_mul(t, e, q, c.ctx) };
            let tp = c.store(t)?;
            // SAFETY: a copy of the field prime, released with the context.
            let prime = unsafe { gcry_mpi_ec_get_mpi(c"p".as_ptr(), c.ctx, 1) };
            if prime.is_null() {
                return Err(oom());
            }
            c.mpis.0.push(prime);
            let ty = c.mpi(&tp.y)?;
            let ny = c.empty_mpi()?;
            // SAFETY: live MPIs.
            unsafe { gcry_mpi_sub(ny, prime, ty) };
            let neg = Point {
                x: tp.x.clone(),
                y: c.bytes(ny)?,
            };
            let nt = c.load(&neg)?;
            // SAFETY: as above: r = P + (−t).
            unsafe { gcry_mpi_ec_add(r, p, nt, c.ctx) };
        }
    }
    c.store(r)
}

/// ECDSA P-521 verification of a SHA-512 `digest` with the JOSE signature
/// (r ‖ s, 66 bytes each).
pub fn ecdsa_verify(key: &Point, digest: &[u8], sig: &[u8]) -> Result<bool, ClevisError> {
    if sig.len() != 2 * COORD {
        return Ok(false);
    }
    init();
    let mut q = Vec::with_capacity(1 + 2 * COORD);
    q.push(4u8);
    q.extend_from_slice(&key.x);
    q.extend_from_slice(&key.y);
    let (mut k, mut d, mut s) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    let mut off = 0usize;
    // SAFETY: the formats' %b take (int length, pointer) pairs, given here with
    // buffers that outlive the calls; the built S-expressions are released below.
    unsafe {
        let e1 = gcry_sexp_build(
            &mut k,
            &mut off,
            c"(public-key(ecc(curve \"NIST P-521\")(q %b)))".as_ptr(),
            q.len() as c_int,
            q.as_ptr(),
        );
        let e2 = gcry_sexp_build(
            &mut d,
            &mut off,
            c"(data(flags raw)(value %b))".as_ptr(),
            digest.len() as c_int,
            digest.as_ptr(),
        );
        let e3 = gcry_sexp_build(
            &mut s,
            &mut off,
            c"(sig-val(ecdsa(r %b)(s %b)))".as_ptr(),
            COORD as c_int,
            sig.as_ptr(),
            COORD as c_int,
            sig[COORD..].as_ptr(),
        );
        let r = if e1 == 0 && e2 == 0 && e3 == 0 {
            Ok(gcry_pk_verify(s, d, k) == 0)
        } else {
            Err(ClevisError::Crypto(
                "libgcrypt could not build the ECDSA input".into(),
            ))
        };
        for p in [k, d, s] {
            if !p.is_null() {
                gcry_sexp_release(p);
            }
        }
        r
    }
}

/// MPIs for the sss arithmetic, released together.
struct Mpis(Vec<Ptr>);

impl Mpis {
    fn scan(&mut self, bytes: &[u8]) -> Result<Ptr, ClevisError> {
        let mut m = std::ptr::null_mut();
        // SAFETY: `bytes` is valid for its length; released in Drop.
        let err = unsafe {
            gcry_mpi_scan(
                &mut m,
                GCRYMPI_FMT_USG,
                bytes.as_ptr(),
                bytes.len(),
                std::ptr::null_mut(),
            )
        };
        if err != 0 || m.is_null() {
            return Err(oom());
        }
        self.0.push(m);
        Ok(m)
    }

    fn new_mpi(&mut self) -> Result<Ptr, ClevisError> {
        // SAFETY: constructor; released in Drop.
        let m = unsafe { gcry_mpi_new(0) };
        if m.is_null() {
            return Err(oom());
        }
        self.0.push(m);
        Ok(m)
    }

    /// `m` as exactly `len` big-endian bytes.
    fn out(&self, m: Ptr, len: usize) -> Result<SecretBytes, ClevisError> {
        let mut buf = SecretBytes::zeroed(len);
        let mut n = 0usize;
        // SAFETY: the buffer holds `len` bytes; libgcrypt reports how many it wrote.
        let err = unsafe {
            gcry_mpi_print(
                GCRYMPI_FMT_USG,
                buf.as_mut_bytes().as_mut_ptr(),
                len,
                &mut n,
                m,
            )
        };
        if err != 0 || n > len {
            return Err(ClevisError::Crypto("libgcrypt MPI encoding failed".into()));
        }
        buf.as_mut_bytes().rotate_right(len - n);
        Ok(buf)
    }
}

impl Drop for Mpis {
    fn drop(&mut self) {
        // SAFETY: each MPI was made here and is released once.
        unsafe {
            for m in self.0.drain(..) {
                gcry_mpi_release(m);
            }
        }
    }
}

/// Is `v` in [1, p)?
pub fn in_field(p: &[u8], v: &[u8]) -> Result<bool, ClevisError> {
    init();
    let mut m = Mpis(Vec::new());
    let (p, v) = (m.scan(p)?, m.scan(v)?);
    // SAFETY: live MPIs.
    Ok(unsafe { gcry_mpi_cmp_ui(v, 0) != 0 && gcry_mpi_cmp(v, p) < 0 })
}

/// Σ c_j·x^j mod p, as `len(p)` bytes.
pub fn poly_eval(p: &[u8], coeffs: &[SecretBytes], x: &[u8]) -> Result<SecretBytes, ClevisError> {
    init();
    let mut m = Mpis(Vec::new());
    let (pm, xm) = (m.scan(p)?, m.scan(x)?);
    let (y, xp, t) = (m.new_mpi()?, m.new_mpi()?, m.new_mpi()?);
    // SAFETY: live MPIs throughout.
    unsafe {
        gcry_mpi_set_ui(y, 0);
        gcry_mpi_set_ui(xp, 1);
    }
    for c in coeffs {
        let cm = m.scan(c.as_bytes())?;
        // SAFETY: live MPIs: y += c·xp; xp *= x (all mod p).
        unsafe {
            gcry_mpi_mulm(t, cm, xp, pm);
            gcry_mpi_addm(y, y, t, pm);
            gcry_mpi_mulm(xp, xp, xm, pm);
        }
    }
    m.out(y, p.len())
}

/// Lagrange interpolation at 0 over GF(p) of the points (x, y).
pub fn lagrange_at_zero(p: &[u8], points: &[(&[u8], &[u8])]) -> Result<SecretBytes, ClevisError> {
    init();
    let mut m = Mpis(Vec::new());
    let pm = m.scan(p)?;
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for (x, y) in points {
        let (xm, ym) = (m.scan(x)?, m.scan(y)?);
        // SAFETY: live MPIs.
        if unsafe { gcry_mpi_cmp(xm, pm) >= 0 || gcry_mpi_cmp(ym, pm) >= 0 } {
            return Err(ClevisError::Malformed("sss share outside the field".into()));
        }
        xs.push(xm);
        ys.push(ym);
    }
    let (k, acc, t, zero) = (m.new_mpi()?, m.new_mpi()?, m.new_mpi()?, m.new_mpi()?);
    // SAFETY: live MPIs.
    unsafe {
        gcry_mpi_set_ui(k, 0);
        gcry_mpi_set_ui(zero, 0);
    }
    for i in 0..xs.len() {
        // SAFETY: live MPIs.
        unsafe { gcry_mpi_set_ui(acc, 1) };
        for j in 0..xs.len() {
            if i == j {
                continue;
            }
            // SAFETY: live MPIs: acc *= (0 − x_j) / (x_i − x_j).
            let invertible = unsafe {
                gcry_mpi_subm(t, zero, xs[j], pm);
                gcry_mpi_mulm(acc, acc, t, pm);
                gcry_mpi_subm(t, xs[i], xs[j], pm);
                gcry_mpi_invm(t, t, pm) != 0
            };
            if !invertible {
                return Err(ClevisError::Malformed(
                    "two sss shares with the same x".into(),
                ));
            }
            // SAFETY: as above.
            unsafe { gcry_mpi_mulm(acc, acc, t, pm) };
        }
        // SAFETY: as above: k += acc·y_i.
        unsafe {
            gcry_mpi_mulm(acc, acc, ys[i], pm);
            gcry_mpi_addm(k, k, acc, pm);
        }
    }
    m.out(k, p.len())
}
