/* lgnet.fabric._fastdma: the compiled per-frame path — SEND_DMA's common case, in C.
 *
 * Rules of this file:
 * - fabric/dma.py is the reference and the tour; this is an accelerator of the same rules
 *   (DESIGN rule 9). It does one case only: a SEND_DMA whose key lookup is remembered
 *   (guest.sends), whose receiver has a free buffer, and whose two lists are good and lie in
 *   private memory. Anything else is "not mine": it answers None (send) or stops (drain)
 *   *before any side effect*, and Python does that SEND_DMA from scratch. So every kill, every
 *   first lookup, every restock, every impaired link and every odd layout stays in dma.py.
 * - Every lguest number comes from lgnet/abi.py through configure() (fabric/fastpath.py calls
 *   it at import): none is written here.
 * - It is plain CPython C API, built by setuptools with the machine's own compiler (setup.py,
 *   optional=True): no runtime dependency, no Cython or cffi to install. Python's buffer
 *   protocol gives us guest memory; every buffer is released before a call returns, so no
 *   mapping is ever pinned past an engine operation (closing an mmap would fail).
 * - The caller holds lguest_lock around each call (Engine.send_dma, Engine.drain_sends).
 *
 * Theory of operation. A call first *plans* a frame: it reads the sender's descriptor, the
 * receiver's next free entry and both lists, and checks everything io.c checks, writing
 * nothing. Only a complete plan is *applied*, in dma_transfer's order: copy, the sender's
 * used_len, the counters, the receiver's used_len after the data (wmb()), next_dma, the
 * capture's hook, the interrupt.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* --- what configure() was told (lgnet/abi.py, fabric/dma.py) -------------------------- */

typedef struct {
    int ready;
    uint64_t dma_size, used_off, addr_off, len_off, sections, page, num_mask;
    uint64_t status_empty, send_dma, ring_size, call_size, irqs, u32_mask;
} Numbers;
static Numbers abi;
static PyObject *DELIVERED;           /* dma.Send.DELIVERED */
static PyObject *GUEST_MEMORY;        /* fabric.memory.GuestMemory: its rules are the ones we know */
static PyObject *LGUEST_DMA;          /* abi.LguestDma, for the capture's hook */

/* Attribute names, interned once. */
static PyObject *s_sends, *s_generation, *s_memory, *s_layout, *s_pfn_limit, *s_regions,
    *s_base, *s_end, *s_view, *s_shared, *s_impair, *s_on_transfer, *s_guest, *s_where,
    *s_dmas, *s_num_dmas, *s_next_dma, *s_interrupt, *s_counters, *s_irqs_pending, *s_woken,
    *s_ring, *s_next_hcall, *s_pending_dma, *s_dead, *s_tx_packets, *s_tx_bytes,
    *s_rx_packets, *s_rx_bytes, *s_tx_carrier_errors;

/* --- one guest's address space, as far as this call has looked ------------------------- */

/* Regions are looked at lazily and their buffers taken on first use; a guest with more
 * regions than this is simply not ours (lgnet's guests have a handful). */
#define SPACE_REGIONS 16

typedef struct {
    PyObject *region;                 /* borrowed from memory.regions (which we hold) */
    uint64_t base, end;
    int shared;                       /* a net file's page: never a fast-path piece */
    int held;                         /* buf taken */
    Py_buffer buf;
} Region;

typedef struct {
    PyObject *guest;                  /* owned, so "the same receiver as last frame" is sound */
    PyObject *memory, *regions;       /* owned */
    uint64_t pfn_limit;
    Py_ssize_t n, seen;               /* regions in the list; how many read into r[] */
    Region r[SPACE_REGIONS];
} Space;

static void space_release(Space *s)
{
    for (Py_ssize_t i = 0; i < s->seen; i++)
        if (s->r[i].held) {
            PyBuffer_Release(&s->r[i].buf);
            s->r[i].held = 0;
        }
    s->seen = 0;
    Py_CLEAR(s->memory);
    Py_CLEAR(s->regions);
    Py_CLEAR(s->guest);
}

/* An int attribute as uint64; -1 with an exception set when absent or not an int. */
static int get_u64(PyObject *obj, PyObject *name, uint64_t *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

/* An engine field that should be a small int: 1 read, 0 not ours (negative or huge: the
 * Python path's arithmetic handles it), -1 error. */
static int get_plain(PyObject *obj, PyObject *name, uint64_t *out)
{
    if (get_u64(obj, name, out) == 0)
        return 1;
    if (!PyErr_ExceptionMatches(PyExc_OverflowError))
        return -1;
    PyErr_Clear();
    return 0;
}

/* 1 ready, 0 not ours (memory of another class, too many regions), -1 error. */
static int space_open(Space *s, PyObject *guest)
{
    Py_INCREF(guest);
    s->guest = guest;
    s->memory = PyObject_GetAttr(guest, s_memory);
    if (s->memory == NULL)
        return -1;
    /* A subclass may change what an access means (tests log them): the Python path's. */
    if ((PyObject *)Py_TYPE(s->memory) != GUEST_MEMORY)
        return 0;
    if (get_u64(s->memory, s_pfn_limit, &s->pfn_limit) < 0)
        return -1;
    s->regions = PyObject_GetAttr(s->memory, s_regions);
    if (s->regions == NULL)
        return -1;
    if (!PyList_CheckExact(s->regions) || PyList_GET_SIZE(s->regions) > SPACE_REGIONS)
        return 0;
    s->n = PyList_GET_SIZE(s->regions);
    s->seen = 0;
    return 1;
}

static int region_read(Space *s, Py_ssize_t i)
{
    Region *r = &s->r[i];
    r->region = PyList_GET_ITEM(s->regions, i);
    r->held = 0;
    if (get_u64(r->region, s_base, &r->base) < 0 || get_u64(r->region, s_end, &r->end) < 0)
        return -1;
    PyObject *shared = PyObject_GetAttr(r->region, s_shared);
    if (shared == NULL)
        return -1;
    r->shared = shared != Py_None;
    Py_DECREF(shared);
    s->seen = i + 1;
    return 0;
}

static int region_hold(Region *r)
{
    if (r->held)
        return 0;
    PyObject *view = PyObject_GetAttr(r->region, s_view);
    if (view == NULL)
        return -1;
    int bad = PyObject_GetBuffer(view, &r->buf, PyBUF_WRITABLE);
    Py_DECREF(view);
    if (bad)
        return -1;
    r->held = 1;
    if ((uint64_t)r->buf.len != r->end - r->base) {
        PyErr_SetString(PyExc_RuntimeError, "a region's view does not match its bounds");
        return -1;
    }
    return 0;
}

/* lguest_address_ok: the end of the access lies below pfn_limit and does not wrap 32 bits. */
static int address_ok(const Space *s, uint64_t addr, uint64_t len)
{
    uint64_t end = (addr + len) & abi.u32_mask;
    return end / abi.page < s->pfn_limit && end >= addr;
}

/* The private region that backs all of [addr, addr+len), held; NULL (no exception) when it is
 * not ours — a hole, across regions, a shared page — or NULL with an exception set. */
static Region *private_window(Space *s, uint64_t addr, uint64_t len, uint8_t **at)
{
    if (!address_ok(s, addr, len))
        return NULL;
    for (Py_ssize_t i = 0; i < s->n; i++) {
        if (i >= s->seen && region_read(s, i) < 0)
            return NULL;
        Region *r = &s->r[i];
        if (r->base <= addr && addr + len <= r->end) {
            if (r->shared)
                return NULL;
            if (region_hold(r) < 0)
                return NULL;
            *at = (uint8_t *)r->buf.buf + (addr - r->base);
            return r;
        }
    }
    return NULL;
}

/* A lookup that found nothing is "not ours"; one that raised is an error. */
#define NOT_OURS() (PyErr_Occurred() ? -1 : 0)

/* --- little-endian fields of guest structs ---------------------------------------------- */

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* memory.write_u32: one aligned native 32-bit store where the region's words allow it (the
 * receiver polls used_len: it must not see a torn length), else four little-endian bytes. */
static uint32_t native32(const uint8_t *at)
{
    uint32_t v;
    memcpy(&v, at, sizeof v);         /* a buffer's start need not be aligned */
    return v;
}

static void store_u32(Region *r, uint8_t *at, uint32_t value)
{
    uint64_t off = (uint64_t)(at - (uint8_t *)r->buf.buf);
    if ((off & 3) == 0 && r->buf.len % 4 == 0) {
        if (((uintptr_t)at & 3) == 0)
            *(volatile uint32_t *)at = value;
        else
            memcpy(at, &value, sizeof value);
    } else {
        at[0] = value & 0xFF; at[1] = value >> 8 & 0xFF;
        at[2] = value >> 16 & 0xFF; at[3] = value >> 24 & 0xFF;
    }
}

/* --- a planned frame --------------------------------------------------------------------- */

typedef struct { uint8_t *at; uint32_t len; Region *region; } Piece;

typedef struct {
    PyObject *binding;                /* owned */
    PyObject *dst_guest;              /* owned */
    uint64_t index, entry, next_dma, interrupt;
    uint8_t *src_used, *dst_used;     /* the two used_len words */
    Region *src_region, *dst_region;
    uint32_t src_used_before;         /* the sender's used_len as it read it (capture) */
    Py_ssize_t nsrc, ndst;
    uint64_t offered;
    uint8_t *src_raw;                 /* the sender's descriptor, read once */
    Piece *src, *dst;
} Plan;

static uint8_t *scratch_raw;          /* two descriptors' bytes (configure) */
static Piece *scratch_pieces;         /* 2 * abi.sections */

static void plan_clear(Plan *p)
{
    Py_CLEAR(p->binding);
    Py_CLEAR(p->dst_guest);
}

/* check_dma_list over a raw struct lguest_dma (io.c): each piece address_ok, at most a page,
 * not crossing a page; the list ends at the first zero length. Here each piece must also lie
 * in one private region: the only case we copy. 1 ours (n pieces >= 1), 0 not, -1 error. */
static int map_list(Space *s, const uint8_t *raw, Piece *out, Py_ssize_t *n, uint64_t *bytes)
{
    uint64_t total = 0;
    Py_ssize_t k = 0;
    for (uint64_t i = 0; i < abi.sections; i++) {
        uint64_t len = le16(raw + abi.len_off + 2 * i);
        if (len == 0)
            break;
        uint64_t addr = le32(raw + abi.addr_off + 4 * i);
        if (!address_ok(s, addr, len) || len > abi.page || addr % abi.page + len > abi.page)
            return 0;                 /* a kill: dma.py says it, with its words */
        Region *r = private_window(s, addr, len, &out[k].at);
        if (r == NULL)
            return NOT_OURS();
        out[k].len = (uint32_t)len;
        out[k].region = r;
        total += len;
        k++;
    }
    *n = k;
    *bytes = total;
    return k > 0;                     /* an empty list: dma.py's "only raises the interrupt" */
}

static int buffers_overlap(const Region *a, const Region *b)
{
    const uint8_t *a0 = a->buf.buf, *b0 = b->buf.buf;
    return a0 < b0 + b->buf.len && b0 < a0 + a->buf.len;
}

/* Two guests' pieces that alias the same bytes would make the order of chunks visible: the
 * Python path's merged runs decide then. (Never in a lab: every guest has its own RAM.) */
static int lists_alias(const Plan *p)
{
    for (Py_ssize_t i = 0; i < p->nsrc; i++)
        for (Py_ssize_t j = 0; j < p->ndst; j++)
            if (buffers_overlap(p->src[i].region, p->dst[j].region))
                return 1;
    return 0;
}

/* Where a bound array lies: next_free_buffer's in-place case, binding.where current (the
 * whole array in one region, with aligned words). */
typedef struct {
    Region *region;                   /* in the receiver's space */
    uint64_t base, num, dmas, next_dma;
} Array;

/* 1 found, 0 not ours (where stale or not in place: dma.py fills it in), -1 error. */
static int array_of(Space *d, PyObject *binding, Array *a)
{
    PyObject *where = PyObject_GetAttr(binding, s_where);
    if (where == NULL)
        return -1;
    PyObject *layout = PyObject_GetAttr(d->memory, s_layout);
    if (layout == NULL) {
        Py_DECREF(where);
        return -1;
    }
    int current = PyTuple_CheckExact(where) && PyTuple_GET_SIZE(where) == 3 &&
                  PyTuple_GET_ITEM(where, 1) != Py_None;
    if (current)
        current = PyObject_RichCompareBool(PyTuple_GET_ITEM(where, 0), layout, Py_EQ);
    Py_DECREF(layout);
    if (current <= 0) {
        Py_DECREF(where);
        return current;
    }
    PyObject *region = PyTuple_GET_ITEM(where, 1);
    unsigned long long base = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(where, 2));
    Py_DECREF(where);                 /* region stays alive: memory.regions holds it */
    if (base == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    Region *r = NULL;
    for (Py_ssize_t i = 0; i < d->n && r == NULL; i++) {
        if (i >= d->seen && region_read(d, i) < 0)
            return -1;
        if (d->r[i].region == region)
            r = &d->r[i];
    }
    int ok;
    if (r == NULL)
        return 0;
    if (region_hold(r) < 0)
        return -1;
    if ((ok = get_plain(binding, s_num_dmas, &a->num)) <= 0 ||
        (ok = get_plain(binding, s_dmas, &a->dmas)) <= 0 ||
        (ok = get_plain(binding, s_next_dma, &a->next_dma)) <= 0)
        return ok;
    /* where's region holds the whole array, aligned: anything else is dma.py's to judge. */
    if (a->num == 0 || a->next_dma > abi.num_mask || (base & 3) || r->buf.len % 4 ||
        base > (uint64_t)r->buf.len || a->num > ((uint64_t)r->buf.len - base) / abi.dma_size)
        return 0;
    a->region = r;
    a->base = base;
    return 1;
}

/* The receiver's next free entry: scan from next_dma, with wrap, for used_len == 0.
 * 1 found, 0 none free (dma.py's NO_BUFFER and its one chance to restock). */
static int free_entry(Space *d, const Array *a, Plan *p, uint8_t **entry_at)
{
    for (uint64_t i = 0; i < a->num; i++) {
        uint64_t index = (a->next_dma + i) % a->num;
        uint8_t *at = (uint8_t *)a->region->buf.buf + a->base + index * abi.dma_size;
        if (native32(at + abi.used_off) == 0) {
            p->index = index;
            p->entry = a->dmas + index * abi.dma_size;
            p->next_dma = a->next_dma;
            p->dst_region = a->region;
            *entry_at = at;
            /* write_u32 of the entry's used_len checks the address like any access. */
            return address_ok(d, p->entry + abi.used_off, 4);
        }
    }
    return 0;
}

/* What a drain worked out about the receiver of the last frame's key, for the next frames:
 * no Python code runs between two frames of a drain without a capture hook, so the same
 * guest.sends entry still means the same binding, interrupt and array, and next_dma is the
 * one we wrote. Owned references; cleared whenever the receiver's space is. */
typedef struct {
    PyObject *found, *binding, *dst_guest;
    uint64_t interrupt;
    Array array;
} Route;

static void route_clear(Route *r)
{
    Py_CLEAR(r->found);
    Py_CLEAR(r->binding);
    Py_CLEAR(r->dst_guest);
}

/* Neither a DMA pending for the Launcher nor dead: 1, else 0; -1 error. */
static int guest_idle(PyObject *guest)
{
    PyObject *pending = PyObject_GetAttr(guest, s_pending_dma);
    if (pending == NULL)
        return -1;
    Py_DECREF(pending);
    PyObject *dead = pending == Py_None ? PyObject_GetAttr(guest, s_dead) : NULL;
    if (dead == NULL)
        return pending == Py_None ? -1 : 0;
    Py_DECREF(dead);
    return dead == Py_None;
}

/* Is the sender's engine state the plain case? 1 yes, 0 no, -1 error. */
static int engine_plain(PyObject *engine)
{
    PyObject *impair = PyObject_GetAttr(engine, s_impair);
    if (impair == NULL)
        return -1;
    Py_DECREF(impair);
    return impair == Py_None;         /* impaired links are judged in dma.py */
}

/* The receiver of a remembered key, worked out afresh: 1 ours (p->binding, p->dst_guest,
 * p->interrupt and *a filled in), 0 not, -1 error. */
static int receiver_of(PyObject *engine, Space *s, Space *d, PyObject *found, Plan *p, Array *a)
{
    PyObject *generation = PyObject_GetAttr(engine, s_generation);
    PyObject *layout = generation ? PyObject_GetAttr(s->memory, s_layout) : NULL;
    int ok = layout == NULL ? -1
             : PyObject_RichCompareBool(PyTuple_GET_ITEM(found, 0), generation, Py_EQ);
    if (ok > 0)
        ok = PyObject_RichCompareBool(PyTuple_GET_ITEM(found, 1), layout, Py_EQ);
    Py_XDECREF(generation);
    Py_XDECREF(layout);
    if (ok <= 0)
        return ok;                    /* stale: dma.py looks the key up again */
    p->binding = PyTuple_GET_ITEM(found, 3);
    Py_INCREF(p->binding);
    PyObject *dst = PyObject_GetAttr(p->binding, s_guest);
    if (dst == NULL)
        return -1;
    p->dst_guest = dst;
    if (d->guest != dst) {
        space_release(d);
        if ((ok = space_open(d, dst)) <= 0)
            return ok;
    }
    if ((ok = get_plain(p->binding, s_interrupt, &p->interrupt)) <= 0)
        return ok;
    if (p->interrupt == 0 || p->interrupt >= abi.irqs)
        return 0;
    return array_of(d, p->binding, a);
}

/* Plan one SEND_DMA(key_addr, udma) of the sender (space s): 1 ours, 0 not, -1 error.
 * `d` is the receiver's space and `route` what the last frame found (both kept across the
 * frames of a drain; route NULL for a lone send). */
static int plan_send(PyObject *engine, Space *s, Space *d, Route *route, PyObject *key_addr,
                     uint64_t udma, Plan *p)
{
    int ok;
    /* The key lookup dma.py remembered: (generation, layout, key, first other binder). */
    PyObject *sends = PyObject_GetAttr(s->guest, s_sends);
    if (sends == NULL)
        return -1;
    PyObject *found = PyDict_CheckExact(sends) ? PyDict_GetItemWithError(sends, key_addr) : NULL;
    Py_DECREF(sends);             /* found stays alive: the guest holds the dict */
    if (found == NULL)
        return NOT_OURS();            /* a first lookup, a private or bad key */
    if (!PyTuple_CheckExact(found) || PyTuple_GET_SIZE(found) != 4 ||
        PyTuple_GET_ITEM(found, 3) == Py_None)
        return 0;                     /* no receiver: dma.py counts it */
    Array array;
    if (route != NULL && route->found == found) {
        p->binding = route->binding;
        p->dst_guest = route->dst_guest;
        Py_INCREF(p->binding);
        Py_INCREF(p->dst_guest);
        p->interrupt = route->interrupt;
        array = route->array;
    } else {
        if (route != NULL)
            route_clear(route);
        if ((ok = receiver_of(engine, s, d, found, p, &array)) <= 0)
            return ok;
        if (route != NULL) {
            Py_INCREF(found);
            Py_INCREF(p->binding);
            Py_INCREF(p->dst_guest);
            *route = (Route){found, p->binding, p->dst_guest, p->interrupt, array};
        }
    }

    /* The sender's descriptor, read once into our own bytes (lgread). */
    uint8_t *desc;
    p->src_region = private_window(s, udma, abi.dma_size, &desc);
    if (p->src_region == NULL)
        return NOT_OURS();
    memcpy(p->src_raw, desc, abi.dma_size);
    p->src_used = desc + abi.used_off;
    p->src_used_before = le32(p->src_raw + abi.used_off);

    /* The receiver's free entry, its list copied out before anything is written. */
    uint8_t *entry_at;
    if ((ok = free_entry(d, &array, p, &entry_at)) <= 0)
        return ok;
    p->dst_used = entry_at + abi.used_off;
    uint8_t *dst_raw = p->src_raw + abi.dma_size;
    memcpy(dst_raw, entry_at, abi.dma_size);

    /* Both lists checked (io.c checks the receiver's first; here neither may fail). */
    uint64_t room;
    if ((ok = map_list(d, dst_raw, p->dst, &p->ndst, &room)) <= 0)
        return ok;
    if ((ok = map_list(s, p->src_raw, p->src, &p->nsrc, &p->offered)) <= 0)
        return ok;
    return !lists_alias(p);
}

/* --- applying a plan: dma_transfer's side effects, in its order --------------------------- */

static int add_counter(PyObject *counters, PyObject *name, uint64_t delta)
{
    PyObject *v = PyObject_GetAttr(counters, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromUnsignedLongLong(delta);
    PyObject *sum = d ? PyNumber_Add(v, d) : NULL;
    Py_DECREF(v);
    Py_XDECREF(d);
    if (sum == NULL)
        return -1;
    int bad = PyObject_SetAttr(counters, name, sum);
    Py_DECREF(sum);
    return bad;
}

/* Engine._count: a short copy is lguest_net's carrier error; bytes both ways. */
static int count(PyObject *src, PyObject *dst, uint64_t copied, uint64_t offered)
{
    PyObject *sc = PyObject_GetAttr(src, s_counters);
    PyObject *dc = sc ? PyObject_GetAttr(dst, s_counters) : NULL;
    int bad = dc == NULL;
    if (!bad && copied != offered)
        bad = add_counter(sc, s_tx_carrier_errors, 1);
    if (!bad && copied)
        bad = add_counter(sc, s_tx_packets, 1) || add_counter(sc, s_tx_bytes, copied) ||
              add_counter(dc, s_rx_packets, 1) || add_counter(dc, s_rx_bytes, copied);
    Py_XDECREF(sc);
    Py_XDECREF(dc);
    return bad ? -1 : 0;
}

static int set_u64(PyObject *obj, PyObject *name, uint64_t value)
{
    PyObject *v = PyLong_FromUnsignedLongLong(value);
    if (v == NULL)
        return -1;
    int bad = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return bad;
}

/* The capture's hook, with what dma.py hands it: (src, binding, index, entry, copied,
 * LguestDma of the sender's descriptor as it was read). 1 it ran, 0 there is none, -1 error. */
static int observe(PyObject *engine, PyObject *src, Plan *p, uint64_t copied)
{
    PyObject *hook = PyObject_GetAttr(engine, s_on_transfer);
    if (hook == NULL)
        return -1;
    if (hook == Py_None) {
        Py_DECREF(hook);
        return 0;
    }
    PyObject *addrs = PyTuple_New((Py_ssize_t)abi.sections);
    PyObject *lens = PyTuple_New((Py_ssize_t)abi.sections);
    PyObject *result = NULL;
    if (addrs != NULL && lens != NULL) {
        for (uint64_t i = 0; i < abi.sections; i++) {
            PyObject *a = PyLong_FromUnsignedLong(le32(p->src_raw + abi.addr_off + 4 * i));
            PyObject *n = PyLong_FromUnsignedLong(le16(p->src_raw + abi.len_off + 2 * i));
            if (a == NULL || n == NULL) {
                Py_XDECREF(a);
                Py_XDECREF(n);
                goto done;
            }
            PyTuple_SET_ITEM(addrs, (Py_ssize_t)i, a);
            PyTuple_SET_ITEM(lens, (Py_ssize_t)i, n);
        }
        PyObject *dma = PyObject_CallFunction(LGUEST_DMA, "kOO",
                                              (unsigned long)p->src_used_before, addrs, lens);
        if (dma != NULL) {
            result = PyObject_CallFunction(hook, "OOKKKO", src, p->binding,
                                           (unsigned long long)p->index,
                                           (unsigned long long)p->entry,
                                           (unsigned long long)copied, dma);
            Py_DECREF(dma);
        }
    }
done:
    Py_XDECREF(addrs);
    Py_XDECREF(lens);
    Py_DECREF(hook);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 1;
}

/* raise_irq: the receiver's interrupt flagged, and it goes on the list of guests to tell. */
static int raise_irq(PyObject *engine, PyObject *guest, uint64_t irq)
{
    PyObject *pending = PyObject_GetAttr(guest, s_irqs_pending);
    PyObject *bit = pending ? PyLong_FromUnsignedLongLong(1ULL << irq) : NULL;
    PyObject *flagged = bit ? PyNumber_Or(pending, bit) : NULL;
    Py_XDECREF(pending);
    Py_XDECREF(bit);
    if (flagged == NULL)
        return -1;
    int bad = PyObject_SetAttr(guest, s_irqs_pending, flagged);
    Py_DECREF(flagged);
    if (bad)
        return -1;
    PyObject *woken = PyObject_GetAttr(engine, s_woken);
    if (woken == NULL)
        return -1;
    bad = PyList_Check(woken) ? PyList_Append(woken, guest)
                              : (PyErr_SetString(PyExc_TypeError, "engine.woken is a list"), -1);
    Py_DECREF(woken);
    return bad;
}

/* dma_transfer's side effects: 1 done and the capture's hook ran (Python ran: what the
 * caller looked at may have moved), 0 done without one, -1 error. */
static int apply(PyObject *engine, Space *s, Plan *p)
{
    /* Copy min(rest of source piece, rest of destination piece) at a time until either list
     * ends: extra source bytes are truncated (io.c's do_dma). */
    uint64_t copied = 0, soff = 0, doff = 0;
    Py_ssize_t si = 0, di = 0;
    while (si < p->nsrc && di < p->ndst) {
        uint64_t n = p->src[si].len - soff, room = p->dst[di].len - doff;
        if (room < n)
            n = room;
        memmove(p->dst[di].at + doff, p->src[si].at + soff, n);
        copied += n;
        soff += n;
        doff += n;
        if (soff == p->src[si].len) { si++; soff = 0; }
        if (doff == p->dst[di].len) { di++; doff = 0; }
    }
    store_u32(p->src_region, p->src_used, (uint32_t)copied);
    if (count(s->guest, p->dst_guest, copied, p->offered) < 0)
        return -1;
    /* The receiver sees the data before the length (lguest's wmb()): one store, last. */
    store_u32(p->dst_region, p->dst_used, (uint32_t)copied);
    if (set_u64(p->binding, s_next_dma, (p->next_dma + 1) & abi.num_mask) < 0)
        return -1;
    int observed = observe(engine, s->guest, p, copied);
    if (observed < 0 || raise_irq(engine, p->dst_guest, p->interrupt) < 0)
        return -1;
    return observed;
}

/* --- the two entry points ---------------------------------------------------------------- */

static int check_ready(void)
{
    if (!abi.ready)
        PyErr_SetString(PyExc_RuntimeError, "_fastdma.configure() was not called");
    return abi.ready;
}

static void plan_init(Plan *p)
{
    memset(p, 0, sizeof *p);
    p->src_raw = scratch_raw;
    p->src = scratch_pieces;
    p->dst = scratch_pieces + abi.sections;
}

PyDoc_STRVAR(send_doc,
"send(engine, guest, key_addr, udma) -> Send.DELIVERED, or None: not the fast case, and\n"
"nothing was touched (the caller runs dma.py's send). Call it under lguest_lock.");

static PyObject *fast_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (!check_ready())
        return NULL;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send(engine, guest, key_addr, udma)");
        return NULL;
    }
    PyObject *engine = args[0], *guest = args[1], *key_addr = args[2];
    unsigned long long udma = PyLong_AsUnsignedLongLong(args[3]);
    if (udma == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();                /* not an address we take: dma.py's */
        Py_RETURN_NONE;
    }
    Space s = {0}, d = {0};
    Plan p;
    plan_init(&p);
    PyObject *result = NULL;
    int ok = engine_plain(engine);
    if (ok > 0)
        ok = space_open(&s, guest);
    if (ok > 0)
        ok = plan_send(engine, &s, &d, NULL, key_addr, udma, &p);
    if (ok > 0)
        ok = apply(engine, &s, &p) < 0 ? -1 : 1;
    if (ok >= 0) {
        result = ok ? DELIVERED : Py_None;
        Py_INCREF(result);
    }
    plan_clear(&p);
    space_release(&d);
    space_release(&s);
    return result;
}

PyDoc_STRVAR(drain_doc,
"drain(engine, guest, limit) -> how many entries of the async ring it ran.\n"
"From guest.next_hcall, the consecutive SEND_DMA entries that are the fast case, at most\n"
"limit: each is done, marked empty, and the cursor moves on. It stops before the first\n"
"entry that is empty, another call, or not the fast case, leaving it untouched for\n"
"hypercalls.drain_async. The ring's window must be a memoryview. Under lguest_lock.");

/* One ring: (window, status offset, calls offset, unpack). */
static PyObject *fast_drain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (!check_ready())
        return NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "drain(engine, guest, limit)");
        return NULL;
    }
    PyObject *engine = args[0], *guest = args[1];
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *ring = PyObject_GetAttr(guest, s_ring);
    if (ring == NULL)
        return NULL;
    Py_ssize_t ran = 0;
    int failed = 0;
    Space s = {0}, d = {0};
    Route route = {0};
    Py_buffer window = {0};
    uint64_t status_at, calls_at, next;
    int ok;
    if (!PyTuple_CheckExact(ring) || PyTuple_GET_SIZE(ring) != 4 ||
        !PyMemoryView_Check(PyTuple_GET_ITEM(ring, 0)))
        goto done;                    /* no ring, or one across two regions: dma.py's */
    status_at = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(ring, 1));
    calls_at = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(ring, 2));
    if (PyErr_Occurred() || PyObject_GetBuffer(PyTuple_GET_ITEM(ring, 0), &window,
                                               PyBUF_WRITABLE) < 0) {
        failed = 1;
        goto done;
    }
    if ((ok = engine_plain(engine)) <= 0 || (ok = space_open(&s, guest)) <= 0) {
        failed = ok < 0;
        goto done;
    }
    while (ran < limit) {
        /* drain_async stops after an entry that left a DMA for the Launcher or a dead
         * guest; such a state is not ours to carry on from. */
        if ((ok = guest_idle(guest)) <= 0) {
            failed = ok < 0;
            break;
        }
        if (get_u64(guest, s_next_hcall, &next) < 0) {
            failed = 1;
            break;
        }
        uint64_t call = calls_at + next * abi.call_size;
        if (next >= abi.ring_size || status_at + next >= (uint64_t)window.len ||
            call + abi.call_size > (uint64_t)window.len)
            break;                    /* let dma.py meet whatever is wrong */
        uint8_t *status = (uint8_t *)window.buf + status_at + next;
        const uint8_t *c = (uint8_t *)window.buf + call;
        if (*status == abi.status_empty || le32(c) != abi.send_dma)
            break;
        Plan p;
        plan_init(&p);
        PyObject *key = PyLong_FromUnsignedLong(le32(c + 4));          /* edx */
        ok = key == NULL ? -1 : plan_send(engine, &s, &d, &route, key, le32(c + 8), &p); /* ebx */
        Py_XDECREF(key);
        /* As drain_async: the cursor moves before the call runs, the entry is freed after. */
        if (ok > 0)
            ok = set_u64(guest, s_next_hcall, (next + 1) % abi.ring_size) < 0 ? -1 : 1;
        int observed = 0;
        if (ok > 0 && (observed = apply(engine, &s, &p)) < 0)
            ok = -1;
        plan_clear(&p);
        if (ok <= 0) {
            failed = ok < 0;
            break;
        }
        route.array.next_dma = (p.next_dma + 1) & abi.num_mask;     /* as apply wrote it */
        *status = (uint8_t)abi.status_empty;
        ran++;
        /* The capture's hook ran Python: what we looked at may have moved, the engine's
         * impairments too. Without it, no Python code ran since we looked, and both spaces
         * stay open for the next frame. */
        if (observed) {
            route_clear(&route);
            space_release(&d);
            space_release(&s);
            if ((ok = engine_plain(engine)) <= 0 || (ok = space_open(&s, guest)) <= 0) {
                failed = ok < 0;
                break;
            }
        }
    }
done:
    if (window.obj != NULL)
        PyBuffer_Release(&window);
    route_clear(&route);
    space_release(&d);
    space_release(&s);
    Py_DECREF(ring);
    if (failed)
        return NULL;
    return PyLong_FromSsize_t(ran);
}

/* --- configure: the numbers, from lgnet/abi.py -------------------------------------------- */

static int take(PyObject *table, const char *name, uint64_t *out)
{
    PyObject *v = PyDict_GetItemString(table, name);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "configure() needs %s", name);
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

static int take_object(PyObject *table, const char *name, PyObject **out)
{
    PyObject *v = PyDict_GetItemString(table, name);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "configure() needs %s", name);
        return -1;
    }
    Py_INCREF(v);
    Py_XSETREF(*out, v);
    return 0;
}

PyDoc_STRVAR(configure_doc,
"configure(table): the lguest numbers and the engine's objects this module needs, by their\n"
"names in lgnet.abi (and DELIVERED, GuestMemory, LguestDma). fabric/fastpath.py calls it.");

static PyObject *configure(PyObject *module, PyObject *table)
{
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "configure(dict)");
        return NULL;
    }
    Numbers n = {0};
    PyObject *delivered = NULL, *guest_memory = NULL, *lguest_dma = NULL;
    if (take(table, "LGUEST_DMA_SIZE", &n.dma_size) || take(table, "DMA_USED_LEN_OFFSET", &n.used_off) ||
        take(table, "DMA_ADDR_OFFSET", &n.addr_off) || take(table, "DMA_LEN_OFFSET", &n.len_off) ||
        take(table, "LGUEST_MAX_DMA_SECTIONS", &n.sections) || take(table, "PAGE_SIZE", &n.page) ||
        take(table, "BIND_NUM_MASK", &n.num_mask) || take(table, "HCALL_STATUS_EMPTY", &n.status_empty) ||
        take(table, "LHCALL_SEND_DMA", &n.send_dma) || take(table, "LHCALL_RING_SIZE", &n.ring_size) ||
        take(table, "ASYNC_HCALL_SIZE", &n.call_size) || take(table, "LGUEST_IRQS", &n.irqs) ||
        take(table, "U32_MASK", &n.u32_mask) ||
        take_object(table, "DELIVERED", &delivered) || take_object(table, "GuestMemory", &guest_memory) ||
        take_object(table, "LguestDma", &lguest_dma))
        goto fail;
    /* The layout this file reads: used_len, addr[] and len[] inside one descriptor, an
     * interrupt bit that fits a word, four u32 per ring entry (eax, edx, ebx). */
    if (n.used_off + 4 > n.dma_size || n.addr_off + 4 * n.sections > n.dma_size ||
        n.len_off + 2 * n.sections > n.dma_size || n.irqs > 64 || n.call_size < 12 ||
        n.page == 0 || n.sections == 0 || n.status_empty > 0xFF ||
        n.dma_size % 4 || n.used_off % 4 || n.ring_size == 0) {
        PyErr_SetString(PyExc_ValueError, "configure(): a layout _fastdma cannot read");
        goto fail;
    }
    /* Only a complete, readable table replaces what we were told before. */
    abi.ready = 0;
    PyMem_Free(scratch_raw);
    PyMem_Free(scratch_pieces);
    scratch_raw = PyMem_Malloc(2 * n.dma_size);
    scratch_pieces = PyMem_Malloc(2 * n.sections * sizeof(Piece));
    if (scratch_raw == NULL || scratch_pieces == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    abi = n;
    Py_XSETREF(DELIVERED, delivered);
    Py_XSETREF(GUEST_MEMORY, guest_memory);
    Py_XSETREF(LGUEST_DMA, lguest_dma);
    abi.ready = 1;
    Py_RETURN_NONE;
fail:
    Py_XDECREF(delivered);
    Py_XDECREF(guest_memory);
    Py_XDECREF(lguest_dma);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)configure, METH_O, configure_doc},
    {"send", (PyCFunction)(void (*)(void))fast_send, METH_FASTCALL, send_doc},
    {"drain", (PyCFunction)(void (*)(void))fast_drain, METH_FASTCALL, drain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "lgnet.fabric._fastdma",
    "The compiled per-frame path of lgnet's DMA engine (see fabric/fastpath.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastdma(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_sends, "sends"); INTERN(s_generation, "generation"); INTERN(s_memory, "memory");
    INTERN(s_layout, "layout"); INTERN(s_pfn_limit, "pfn_limit"); INTERN(s_regions, "regions");
    INTERN(s_base, "base"); INTERN(s_end, "end"); INTERN(s_view, "view");
    INTERN(s_shared, "shared"); INTERN(s_impair, "impair"); INTERN(s_on_transfer, "on_transfer");
    INTERN(s_guest, "guest"); INTERN(s_where, "where"); INTERN(s_dmas, "dmas");
    INTERN(s_num_dmas, "num_dmas"); INTERN(s_next_dma, "next_dma");
    INTERN(s_interrupt, "interrupt"); INTERN(s_counters, "counters");
    INTERN(s_irqs_pending, "irqs_pending"); INTERN(s_woken, "woken"); INTERN(s_ring, "ring");
    INTERN(s_next_hcall, "next_hcall"); INTERN(s_pending_dma, "pending_dma");
    INTERN(s_dead, "dead"); INTERN(s_tx_packets, "tx_packets"); INTERN(s_tx_bytes, "tx_bytes");
    INTERN(s_rx_packets, "rx_packets"); INTERN(s_rx_bytes, "rx_bytes");
    INTERN(s_tx_carrier_errors, "tx_carrier_errors");
#undef INTERN
    return PyModule_Create(&module_def);
}
