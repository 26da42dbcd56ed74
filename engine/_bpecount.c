/* Exact byte-level BPE token counts for one split rule: single digits, then GPT-2's pattern
 * (engine/tokenizer.py DIGITS_PAT_STR), split by hand instead of by a regex engine.
 *
 * The result equals len(Tokenizer.encode(text)): tiktoken's encode_ordinary with rank = token
 * id, less the bytes the vocabulary lacks (encode drops them): the pieces are tiktoken's regex matches, a piece that is a whole token counts one, any other
 * piece is merged lowest rank first, leftmost first, as tiktoken merges. Most pieces of code
 * repeat ("self", " =", "\n    "), so a per-thread memo maps a piece's bytes to its count.
 * Counting runs with the GIL released; a Counter is read-only once built, a Memo is used by
 * one call at a time (a busy memo is simply not used). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_bpecount_tables.h"

enum { C_OTHER = 0, C_LETTER = 1, C_NUMBER = 2, C_SPACE = 3 };

#define MEMO_MAX_PIECE 128          /* longer pieces are rare and rarely repeat */
#define MEMO_MAX_ENTRIES (1u << 19)  /* ~30 MB a thread at most; past that, new pieces are not remembered */
#define SHORT_PIECE 64           /* longer pieces merge through a heap, not by scanning */

static unsigned char ascii_class[128];

static int class_of(uint32_t cp) {
    if (cp < 128) return ascii_class[cp];
    int lo = 0, hi = BPE_CLASS_RANGE_COUNT - 1;
    while (lo <= hi) {
        int mid = (lo + hi) >> 1;
        if (cp < bpe_class_ranges[mid].first) hi = mid - 1;
        else if (cp > bpe_class_ranges[mid].last) lo = mid + 1;
        else return bpe_class_ranges[mid].cls;
    }
    return C_OTHER;
}

/* The class of the (valid UTF-8) character at s[i]; its length in *len. */
static inline int class_at(const uint8_t *s, Py_ssize_t i, int *len) {
    uint8_t b = s[i];
    if (b < 0x80) { *len = 1; return ascii_class[b]; }
    uint32_t cp;
    if (b < 0xE0) { cp = ((uint32_t)(b & 0x1F) << 6) | (s[i + 1] & 0x3F); *len = 2; }
    else if (b < 0xF0) { cp = ((uint32_t)(b & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F); *len = 3; }
    else {
        cp = ((uint32_t)(b & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) | ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
        *len = 4;
    }
    return class_of(cp);
}

static inline Py_ssize_t run_end(const uint8_t *s, Py_ssize_t j, Py_ssize_t n, int cls) {
    int len;
    while (j < n && class_at(s, j, &len) == cls) j += len;
    return j;
}

/* End of the piece starting at i: the first alternative of
 *   \p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+
 * that matches there, as the regex engine's leftmost-first alternation picks it. */
static Py_ssize_t piece_end(const uint8_t *s, Py_ssize_t i, Py_ssize_t n) {
    int len, next_len;
    int cls = class_at(s, i, &len);
    if (cls == C_NUMBER) return i + len;
    if (s[i] == '\'' && i + 1 < n) {
        uint8_t a = s[i + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            uint8_t b = s[i + 2];
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
    }
    if (cls != C_SPACE) return run_end(s, i + len, n, cls);   /* letters, or other symbols */
    if (s[i] == ' ' && i + 1 < n) {
        int next = class_at(s, i + 1, &next_len);
        if (next == C_LETTER || next == C_OTHER) return run_end(s, i + 1 + next_len, n, next);
    }
    /* a whitespace run: whole before a digit or at the end; else all but its last character
     * (which then leads the next piece), unless that would leave it empty */
    Py_ssize_t last = i, j = i + len;
    int next = C_OTHER;
    while (j < n) {
        next = class_at(s, j, &next_len);
        if (next != C_SPACE) break;
        last = j;
        j += next_len;
    }
    if (j == n || next == C_NUMBER || last == i) return j;
    return last;
}

/* ---- byte-string hash table ------------------------------------------------------------ */

static inline uint64_t hash_bytes(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
        p += 8;
        n -= 8;
    }
    if (n > 0) {
        uint64_t w = 0;
        memcpy(&w, p, (size_t)n);
        h = (h ^ w) * 0x94D049BB133111EBull;
        h ^= h >> 29;
    }
    h *= 0xBF58476D1CE4E5B9ull;
    return h ^ (h >> 32);
}

typedef struct {
    uint64_t hash;
    uint32_t offset;   /* into the table's byte arena */
    uint32_t length;   /* 0: empty slot */
    uint32_t value;
} slot_t;

typedef struct {
    slot_t *slots;
    size_t mask;       /* capacity - 1, capacity a power of two */
    size_t used;
    uint8_t *arena;
    size_t arena_used, arena_size;
} table_t;

static int table_init(table_t *t, size_t capacity) {
    size_t cap = 16;
    while (cap < capacity * 2) cap <<= 1;
    t->slots = calloc(cap, sizeof(slot_t));
    t->mask = cap - 1;
    t->used = 0;
    t->arena_size = 4096;
    t->arena = malloc(t->arena_size);
    t->arena_used = 0;
    return t->slots && t->arena ? 0 : -1;
}

static void table_free(table_t *t) {
    free(t->slots);
    free(t->arena);
    t->slots = NULL;
    t->arena = NULL;
}

/* Most keys are a few bytes: compared a word at a time inline, not through a libc call. */
static inline int same_bytes(const uint8_t *a, const uint8_t *b, Py_ssize_t n) {
    while (n >= 8) {
        uint64_t x, y;
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        if (x != y) return 0;
        a += 8;
        b += 8;
        n -= 8;
    }
    while (n-- > 0) {
        if (*a++ != *b++) return 0;
    }
    return 1;
}

static inline const slot_t *table_find(const table_t *t, const uint8_t *p, Py_ssize_t n, uint64_t h) {
    size_t i = (size_t)h & t->mask;
    for (;;) {
        const slot_t *slot = &t->slots[i];
        if (slot->length == 0) return NULL;
        if (slot->hash == h && slot->length == (uint32_t)n && same_bytes(t->arena + slot->offset, p, n)) return slot;
        i = (i + 1) & t->mask;
    }
}

static int table_grow(table_t *t) {
    size_t cap = (t->mask + 1) * 2;
    slot_t *slots = calloc(cap, sizeof(slot_t));
    if (!slots) return -1;
    for (size_t k = 0; k <= t->mask; k++) {
        slot_t *old = &t->slots[k];
        if (old->length == 0) continue;
        size_t i = (size_t)old->hash & (cap - 1);
        while (slots[i].length) i = (i + 1) & (cap - 1);
        slots[i] = *old;
    }
    free(t->slots);
    t->slots = slots;
    t->mask = cap - 1;
    return 0;
}

/* Adds a key known to be absent; -1 when out of memory (the table is unchanged). */
static int table_add(table_t *t, const uint8_t *p, Py_ssize_t n, uint64_t h, uint32_t value) {
    if (n <= 0 || (uint64_t)n > UINT32_MAX) return -1;
    if ((t->used + 1) * 4 > (t->mask + 1) * 3 && table_grow(t) < 0) return -1;
    if (t->arena_used + (size_t)n > t->arena_size) {
        size_t size = t->arena_size;
        while (t->arena_used + (size_t)n > size) size *= 2;
        if (size > UINT32_MAX) return -1;
        uint8_t *arena = realloc(t->arena, size);
        if (!arena) return -1;
        t->arena = arena;
        t->arena_size = size;
    }
    memcpy(t->arena + t->arena_used, p, (size_t)n);
    size_t i = (size_t)h & t->mask;
    while (t->slots[i].length) i = (i + 1) & t->mask;
    t->slots[i].hash = h;
    t->slots[i].offset = (uint32_t)t->arena_used;
    t->slots[i].length = (uint32_t)n;
    t->slots[i].value = value;
    t->arena_used += (size_t)n;
    t->used++;
    return 0;
}

/* ---- Counter ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    table_t ranks;            /* token bytes -> rank (= token id) */
    uint8_t byte_counts[256]; /* 1 for a byte the vocabulary has, 0 for one it lacks (dropped) */
} CounterObject;

typedef struct {
    PyObject_HEAD
    table_t pieces;           /* piece bytes -> token count */
    int busy;
} MemoObject;

#define NO_RANK UINT32_MAX

static inline uint32_t rank_of(const CounterObject *c, const uint8_t *p, Py_ssize_t n) {
    const slot_t *slot = table_find(&c->ranks, p, n, hash_bytes(p, n));
    return slot ? slot->value : NO_RANK;
}

/* tiktoken's merge loop over one short piece: scan for the lowest pair rank, leftmost first,
 * join that pair, repeat; returns the count of its tokens, lacking bytes left out.
 * starts[k] is where part k begins; pair_rank[k] the rank of parts k and k+1 joined. */
static Py_ssize_t merge_count_short(const CounterObject *c, const uint8_t *p, Py_ssize_t n) {
    Py_ssize_t starts[SHORT_PIECE + 1];
    uint32_t pair_rank[SHORT_PIECE + 1];
    Py_ssize_t parts = n;   /* starts[parts] == n closes the last part */
    for (Py_ssize_t k = 0; k <= n; k++) starts[k] = k;
    for (Py_ssize_t k = 0; k + 1 < parts; k++) pair_rank[k] = rank_of(c, p + k, 2);
    pair_rank[parts - 1] = NO_RANK;
    while (parts > 1) {
        uint32_t best = NO_RANK;
        Py_ssize_t at = -1;
        for (Py_ssize_t k = 0; k + 1 < parts; k++) {
            if (pair_rank[k] < best) {
                best = pair_rank[k];
                at = k;
            }
        }
        if (at < 0) break;
        memmove(starts + at + 1, starts + at + 2, sizeof(Py_ssize_t) * (size_t)(parts - at - 1));
        memmove(pair_rank + at + 1, pair_rank + at + 2, sizeof(uint32_t) * (size_t)(parts - at - 2));
        parts--;
        pair_rank[at] = at + 1 < parts ? rank_of(c, p + starts[at], starts[at + 2] - starts[at]) : NO_RANK;
        if (at > 0) pair_rank[at - 1] = rank_of(c, p + starts[at - 1], starts[at + 1] - starts[at - 1]);
    }
    Py_ssize_t count = 0;
    for (Py_ssize_t k = 0; k < parts; k++) {
        /* only single bytes can be lacking: no merge involves a byte the vocabulary lacks */
        count += starts[k + 1] - starts[k] == 1 ? c->byte_counts[p[starts[k]]] : 1;
    }
    return count;
}

/* The same merges for a long piece in O(n log n): parts form a linked list (named by the
 * byte where they start) and candidate pairs sit in a heap ordered by (rank, start), so the
 * pair popped is the lowest rank, leftmost first, exactly as the scan picks it. An entry is
 * stale when its part was absorbed or its pair's rank changed. -1 when out of memory. */
typedef struct { uint32_t rank; uint32_t start; } candidate_t;

static inline int candidate_before(candidate_t a, candidate_t b) {
    return a.rank < b.rank || (a.rank == b.rank && a.start < b.start);
}

static void heap_push(candidate_t *heap, size_t *size, candidate_t item) {
    size_t i = (*size)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!candidate_before(item, heap[parent])) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = item;
}

static candidate_t heap_pop(candidate_t *heap, size_t *size) {
    candidate_t top = heap[0], last = heap[--(*size)];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *size) break;
        if (child + 1 < *size && candidate_before(heap[child + 1], heap[child])) child++;
        if (!candidate_before(heap[child], last)) break;
        heap[i] = heap[child];
        i = child;
    }
    if (*size > 0) heap[i] = last;
    return top;
}

static Py_ssize_t merge_count_long(const CounterObject *c, const uint8_t *p, Py_ssize_t n) {
    if ((uint64_t)n >= UINT32_MAX / 4) return -1;
    uint32_t *next = malloc(sizeof(uint32_t) * (size_t)(n + 1));   /* start of the following part */
    uint32_t *prev = malloc(sizeof(uint32_t) * (size_t)(n + 1));
    uint32_t *pair_rank = malloc(sizeof(uint32_t) * (size_t)(n + 1));
    uint8_t *alive = malloc((size_t)n + 1);
    candidate_t *heap = malloc(sizeof(candidate_t) * (size_t)(3 * n + 1));  /* n-1 at first, at most 2 per merge */
    Py_ssize_t count = -1;
    if (!next || !prev || !pair_rank || !alive || !heap) goto done;
    size_t size = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        next[k] = (uint32_t)(k + 1);
        prev[k] = (uint32_t)(k - 1);
        alive[k] = 1;
        pair_rank[k] = k + 1 < n ? rank_of(c, p + k, 2) : NO_RANK;
        if (pair_rank[k] != NO_RANK) heap_push(heap, &size, (candidate_t){pair_rank[k], (uint32_t)k});
    }
    while (size > 0) {
        candidate_t best = heap_pop(heap, &size);
        uint32_t at = best.start;
        if (!alive[at] || pair_rank[at] != best.rank) continue;   /* stale */
        uint32_t absorbed = next[at];
        alive[absorbed] = 0;
        next[at] = next[absorbed];
        if (next[at] < (uint32_t)n) prev[next[at]] = at;
        /* the joined part's pair with its new neighbour, and its left neighbour's pair with it */
        if (next[at] < (uint32_t)n) {
            uint32_t end = next[next[at]];
            pair_rank[at] = rank_of(c, p + at, (Py_ssize_t)end - at);
            if (pair_rank[at] != NO_RANK) heap_push(heap, &size, (candidate_t){pair_rank[at], at});
        } else {
            pair_rank[at] = NO_RANK;
        }
        if (at > 0) {
            uint32_t left = prev[at];
            pair_rank[left] = rank_of(c, p + left, (Py_ssize_t)next[at] - left);
            if (pair_rank[left] != NO_RANK) heap_push(heap, &size, (candidate_t){pair_rank[left], left});
        }
    }
    count = 0;
    for (uint32_t k = 0; k < (uint32_t)n; k = next[k]) count += next[k] - k == 1 ? c->byte_counts[p[k]] : 1;
done:
    free(next);
    free(prev);
    free(pair_rank);
    free(alive);
    free(heap);
    return count;
}

static Py_ssize_t merge_count(const CounterObject *c, const uint8_t *p, Py_ssize_t n) {
    return n <= SHORT_PIECE ? merge_count_short(c, p, n) : merge_count_long(c, p, n);
}

static Py_ssize_t piece_count(const CounterObject *c, const uint8_t *p, Py_ssize_t n) {
    if (n == 1) return c->byte_counts[p[0]];
    if (rank_of(c, p, n) != NO_RANK) return 1;
    return merge_count(c, p, n);
}

/* The count of a whole text; -1 when out of memory. */
static Py_ssize_t text_count(const CounterObject *c, table_t *memo, const uint8_t *s, Py_ssize_t n) {
    Py_ssize_t total = 0, i = 0;
    while (i < n) {
        Py_ssize_t end = piece_end(s, i, n), len = end - i, count;
        const uint8_t *p = s + i;
        if (memo && len > 1 && len <= MEMO_MAX_PIECE) {
            uint64_t h = hash_bytes(p, len);
            const slot_t *slot = table_find(memo, p, len, h);
            if (slot) {
                count = slot->value;
            } else {
                count = piece_count(c, p, len);
                if (count < 0) return -1;
                if (memo->used < MEMO_MAX_ENTRIES) table_add(memo, p, len, h, (uint32_t)count);  /* full: just not remembered */
            }
        } else {
            count = piece_count(c, p, len);
            if (count < 0) return -1;
        }
        total += count;
        i = end;
    }
    return total;
}

static void Counter_dealloc(CounterObject *self) {
    table_free(&self->ranks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Counter_init(CounterObject *self, PyObject *args, PyObject *kwds) {
    /* tokens: every id's bytes (rank = id); skip: ids outside the rank table (specials,
     * unused, unreachable). A byte no token spells is one the vocabulary lacks: tiktoken
     * ranks it past the end and encode drops it, so it counts zero here. */
    static char *keywords[] = {"tokens", "skip", NULL};
    PyObject *tokens, *skip;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O", keywords, &PyList_Type, &tokens, &skip)) return -1;
    if (self->ranks.slots) {
        PyErr_SetString(PyExc_RuntimeError, "Counter is already initialised");
        return -1;
    }
    Py_ssize_t count = PyList_GET_SIZE(tokens);
    if ((uint64_t)count >= NO_RANK) {
        PyErr_SetString(PyExc_ValueError, "too many tokens");
        return -1;
    }
    uint8_t *skipped = calloc((size_t)count + 1, 1);
    if (!skipped) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *iterator = PyObject_GetIter(skip), *item;
    if (!iterator) goto fail;
    while ((item = PyIter_Next(iterator))) {
        Py_ssize_t id = PyLong_AsSsize_t(item);
        Py_DECREF(item);
        if (id == -1 && PyErr_Occurred()) break;
        if (id >= 0 && id < count) skipped[id] = 1;
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) goto fail;
    if (table_init(&self->ranks, (size_t)count) < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    memset(self->byte_counts, 0, sizeof(self->byte_counts));
    for (Py_ssize_t id = 0; id < count; id++) {
        if (skipped[id]) continue;
        PyObject *token = PyList_GET_ITEM(tokens, id);
        if (!PyBytes_Check(token)) {
            PyErr_SetString(PyExc_TypeError, "tokens must be bytes");
            goto fail;
        }
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(token);
        Py_ssize_t n = PyBytes_GET_SIZE(token);
        if (n == 0) continue;                      /* never a BPE result */
        uint64_t h = hash_bytes(p, n);
        if (table_find(&self->ranks, p, n, h)) {
            PyErr_Format(PyExc_ValueError, "token %zd repeats an earlier token's bytes", id);
            goto fail;
        }
        if (table_add(&self->ranks, p, n, h, (uint32_t)id) < 0) {
            PyErr_NoMemory();
            goto fail;
        }
        if (n == 1) self->byte_counts[p[0]] = 1;
    }
    free(skipped);
    return 0;
fail:
    free(skipped);
    return -1;
}

static PyTypeObject MemoType;

/* The text's UTF-8 bytes without copying ASCII text; *owner holds a copy when one was made.
 * Lone surrogates raise UnicodeEncodeError, as tiktoken's encoding does. */
static const uint8_t *utf8_of(PyObject *text, Py_ssize_t *n, PyObject **owner) {
    *owner = NULL;
    if (PyUnicode_IS_ASCII(text)) {
        *n = PyUnicode_GET_LENGTH(text);
        return (const uint8_t *)PyUnicode_DATA(text);
    }
    *owner = PyUnicode_AsUTF8String(text);
    if (!*owner) return NULL;
    *n = PyBytes_GET_SIZE(*owner);
    return (const uint8_t *)PyBytes_AS_STRING(*owner);
}

static PyObject *Counter_count(CounterObject *self, PyObject *args) {
    PyObject *text, *memo_arg = Py_None;
    if (!PyArg_ParseTuple(args, "U|O", &text, &memo_arg)) return NULL;
    if (!self->ranks.slots) {
        PyErr_SetString(PyExc_RuntimeError, "Counter is not initialised");
        return NULL;
    }
    MemoObject *memo = NULL;
    if (memo_arg != Py_None) {
        if (!PyObject_TypeCheck(memo_arg, &MemoType)) {
            PyErr_SetString(PyExc_TypeError, "memo must be a Memo or None");
            return NULL;
        }
        memo = (MemoObject *)memo_arg;
        if (memo->busy) memo = NULL;   /* another thread holds it: count without it */
        else memo->busy = 1;           /* set with the GIL held, so no other call sees it free */
    }
    Py_ssize_t n, total;
    PyObject *owner;
    const uint8_t *s = utf8_of(text, &n, &owner);
    if (!s) {
        if (memo) memo->busy = 0;
        return NULL;
    }
    Py_INCREF(text);
    Py_BEGIN_ALLOW_THREADS
    total = text_count(self, memo ? &memo->pieces : NULL, s, n);
    Py_END_ALLOW_THREADS
    Py_DECREF(text);
    Py_XDECREF(owner);
    if (memo) memo->busy = 0;
    if (total < 0) return PyErr_NoMemory();
    return PyLong_FromSsize_t(total);
}

static PyObject *Counter_pieces(CounterObject *self, PyObject *args) {
    /* The split alone, as UTF-8 bytes objects (tests compare it with the regex's matches). */
    PyObject *text;
    if (!PyArg_ParseTuple(args, "U", &text)) return NULL;
    Py_ssize_t n;
    PyObject *owner;
    const uint8_t *s = utf8_of(text, &n, &owner);
    if (!s) return NULL;
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < n;) {
        Py_ssize_t end = piece_end(s, i, n);
        PyObject *piece = PyBytes_FromStringAndSize((const char *)s + i, end - i);
        if (!piece || PyList_Append(out, piece) < 0) Py_CLEAR(out);
        Py_XDECREF(piece);
        i = end;
    }
    Py_XDECREF(owner);
    return out;
}

static PyMethodDef Counter_methods[] = {
    {"count", (PyCFunction)Counter_count, METH_VARARGS,
     "count(text, memo=None) -> int: the text's token count (the GIL is released while counting)"},
    {"pieces", (PyCFunction)Counter_pieces, METH_VARARGS, "pieces(text) -> list[bytes]: the pre-tokenizer's split"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine._bpecount.Counter",
    .tp_basicsize = sizeof(CounterObject),
    .tp_dealloc = (destructor)Counter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counter(tokens: list[bytes], skip: Iterable[int]): exact BPE token counts, rank = id",
    .tp_methods = Counter_methods,
    .tp_init = (initproc)Counter_init,
    .tp_new = PyType_GenericNew,
};

/* ---- Memo ------------------------------------------------------------------------------- */

static void Memo_dealloc(MemoObject *self) {
    table_free(&self->pieces);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Memo_init(MemoObject *self, PyObject *args, PyObject *kwds) {
    static char *keywords[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", keywords)) return -1;
    if (self->pieces.slots) return 0;
    if (table_init(&self->pieces, 1 << 14) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static Py_ssize_t Memo_len(MemoObject *self) { return (Py_ssize_t)self->pieces.used; }

static PySequenceMethods Memo_as_sequence = {.sq_length = (lenfunc)Memo_len};

static PyTypeObject MemoType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine._bpecount.Memo",
    .tp_basicsize = sizeof(MemoObject),
    .tp_dealloc = (destructor)Memo_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Memo(): piece -> token count, for one thread's Counter.count calls",
    .tp_as_sequence = &Memo_as_sequence,
    .tp_init = (initproc)Memo_init,
    .tp_new = PyType_GenericNew,
};

/* ---- rank table derivation -------------------------------------------------------------
 * engine/tokenizer.py build_byte_level_table, the same steps in C (~25 ms instead of ~80 ms
 * of Python before a cold pack's first count): token spellings to bytes, the merge-order
 * check, unreachable tokens out of the rank table. Any merge the check rejects returns None,
 * and the Python code runs to raise its exact error. */

#define KIND_UNKNOWN 2
#define KIND_CONTROL 3
#define KIND_USER_DEFINED 4
#define KIND_UNUSED 5

static uint8_t shifted_byte[68];   /* GPT-2's byte spelling: chr(256 + k) stands for shifted_byte[k] */

static void init_byte_spelling(void) {
    int k = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        if (!printable) shifted_byte[k++] = (uint8_t)b;
    }
}

/* The bytes a token spelling stands for (as str.translate + encode("latin-1") gives them:
 * code points below 256 are their own byte); 0 when a character is outside the spelling. */
static int spelling_to_bytes(const uint8_t *s, Py_ssize_t n, uint8_t *out, Py_ssize_t *out_len) {
    Py_ssize_t i = 0, o = 0;
    while (i < n) {
        uint32_t cp;
        uint8_t b = s[i];
        if (b < 0x80) { cp = b; i += 1; }
        else if (b < 0xE0) { cp = ((uint32_t)(b & 0x1F) << 6) | (s[i + 1] & 0x3F); i += 2; }
        else if (b < 0xF0) { cp = ((uint32_t)(b & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F); i += 3; }
        else { return 0; }
        if (cp < 256) out[o++] = (uint8_t)cp;
        else if (cp < 256 + 68) out[o++] = shifted_byte[cp - 256];
        else return 0;
    }
    *out_len = o;
    return 1;
}

static PyObject *derive_table(PyObject *module, PyObject *args) {
    PyObject *tokens, *kinds, *merges;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &tokens, &PyList_Type, &kinds, &PyList_Type, &merges)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(tokens), n_merges = PyList_GET_SIZE(merges);
    if (PyList_GET_SIZE(kinds) != n) {
        PyErr_SetString(PyExc_ValueError, "tokens and kinds differ in length");
        return NULL;
    }
    PyObject *result = NULL, *id_bytes = NULL, *special_ids = NULL, *non_rank = NULL, *extra = NULL;
    table_t texts = {0}, seen = {0};
    const uint8_t **utf8 = calloc((size_t)n + 1, sizeof(*utf8));
    Py_ssize_t *utf8_len = calloc((size_t)n + 1, sizeof(*utf8_len));
    uint32_t *text_of = calloc((size_t)n + 1, sizeof(uint32_t));     /* token id -> distinct text */
    uint32_t *last_id = calloc((size_t)n + 1, sizeof(uint32_t));     /* distinct text -> its last id */
    uint8_t *special_text = calloc((size_t)n + 1, 1), *produced = calloc((size_t)n + 1, 1);
    uint8_t *skip = calloc((size_t)n + 1, 1), *ranked = calloc((size_t)n + 1, 1);
    long *kind_of = calloc((size_t)n + 1, sizeof(long));
    uint8_t *buffer = NULL;
    size_t buffer_size = 0;
    uint8_t have_byte[256] = {0};
    int empty_seen = 0;
    if (!utf8 || !utf8_len || !text_of || !last_id || !special_text || !produced || !skip || !ranked || !kind_of ||
        table_init(&texts, (size_t)n) < 0 || table_init(&seen, (size_t)n) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    /* every token's text -> its last id (as a dict built in id order keeps it) */
    for (Py_ssize_t id = 0; id < n; id++) {
        PyObject *text = PyList_GET_ITEM(tokens, id);
        if (!PyUnicode_Check(text)) {
            PyErr_SetString(PyExc_TypeError, "tokens must be str");
            goto done;
        }
        utf8[id] = (const uint8_t *)PyUnicode_AsUTF8AndSize(text, &utf8_len[id]);
        if (!utf8[id]) goto done;
        kind_of[id] = PyLong_AsLong(PyList_GET_ITEM(kinds, id));
        if (kind_of[id] == -1 && PyErr_Occurred()) goto done;
        uint64_t h = hash_bytes(utf8[id], utf8_len[id]);
        const slot_t *slot = utf8_len[id] ? table_find(&texts, utf8[id], utf8_len[id], h) : NULL;
        uint32_t k;
        if (slot) {
            k = slot->value;
        } else {
            k = (uint32_t)texts.used;
            if (utf8_len[id] && table_add(&texts, utf8[id], utf8_len[id], h, k) < 0) {
                PyErr_NoMemory();
                goto done;
            }
            if (!utf8_len[id]) k = (uint32_t)n;  /* "" never matches a merge part (both are non-empty) */
        }
        text_of[id] = k;
        last_id[k] = (uint32_t)id;
        if (kind_of[id] == KIND_CONTROL || kind_of[id] == KIND_USER_DEFINED) special_text[k] = 1;
    }
    /* merges: "left right", both tokens, producing a non-special token, ids rising */
    long previous = -1;
    for (Py_ssize_t index = 0; index < n_merges; index++) {
        PyObject *merge = PyList_GET_ITEM(merges, index);
        Py_ssize_t len;
        const uint8_t *m = PyUnicode_Check(merge) ? (const uint8_t *)PyUnicode_AsUTF8AndSize(merge, &len) : NULL;
        if (!m) goto invalid;
        const uint8_t *space = memchr(m, ' ', (size_t)len);
        if (!space || space == m || space == m + len - 1) goto invalid;
        Py_ssize_t left_len = space - m, right_len = len - left_len - 1;
        if (!table_find(&texts, m, left_len, hash_bytes(m, left_len)) ||
            !table_find(&texts, space + 1, right_len, hash_bytes(space + 1, right_len))) goto invalid;
        if ((size_t)(len - 1) > buffer_size) {
            buffer_size = (size_t)len * 2;
            free(buffer);
            buffer = malloc(buffer_size);
            if (!buffer) {
                PyErr_NoMemory();
                goto done;
            }
        }
        memcpy(buffer, m, (size_t)left_len);
        memcpy(buffer + left_len, space + 1, (size_t)right_len);
        const slot_t *slot = table_find(&texts, buffer, len - 1, hash_bytes(buffer, len - 1));
        if (!slot || special_text[slot->value] || (long)last_id[slot->value] <= previous) goto invalid;
        previous = (long)last_id[slot->value];
        produced[slot->value] = 1;
    }
    /* every id's bytes; ids out of the rank table */
    id_bytes = PyList_New(n);
    special_ids = PyList_New(0);
    if (!id_bytes || !special_ids) goto done;
    for (Py_ssize_t id = 0; id < n; id++) {
        PyObject *raw;
        if (kind_of[id] == KIND_CONTROL || kind_of[id] == KIND_USER_DEFINED) {
            PyObject *number = PyLong_FromSsize_t(id);
            if (!number || PyList_Append(special_ids, number) < 0) {
                Py_XDECREF(number);
                goto done;
            }
            Py_DECREF(number);
            skip[id] = 1;
            raw = PyBytes_FromStringAndSize((const char *)utf8[id], utf8_len[id]);
        } else {
            if ((size_t)utf8_len[id] > buffer_size) {
                buffer_size = (size_t)utf8_len[id] * 2;
                free(buffer);
                buffer = malloc(buffer_size);
                if (!buffer) {
                    PyErr_NoMemory();
                    goto done;
                }
            }
            Py_ssize_t raw_len = 0;
            int valid = spelling_to_bytes(utf8[id], utf8_len[id], buffer, &raw_len);
            uint64_t h = valid ? hash_bytes(buffer, raw_len) : 0;
            if (kind_of[id] == KIND_UNKNOWN || kind_of[id] == KIND_UNUSED || !valid ||
                (raw_len && table_find(&seen, buffer, raw_len, h))) {
                skip[id] = 1;
            } else if (raw_len) {
                if (table_add(&seen, buffer, raw_len, h, (uint32_t)id) < 0) {
                    PyErr_NoMemory();
                    goto done;
                }
                ranked[id] = 1;
            } else if (empty_seen) {
                skip[id] = 1;     /* a second b"" repeats the first */
            } else {
                ranked[id] = 1;   /* b"": ranked in Python too (never a BPE result) */
                empty_seen = 1;
            }
            raw = valid ? PyBytes_FromStringAndSize((const char *)buffer, raw_len)
                        : PyBytes_FromStringAndSize((const char *)utf8[id], utf8_len[id]);
            /* tokens longer than one byte that no merge produces are unreachable */
            if (ranked[id] && raw_len > 1 && (text_of[id] == (uint32_t)n || !produced[text_of[id]])) skip[id] = 1;
            if (ranked[id] && raw_len == 1) have_byte[buffer[0]] = 1;
        }
        if (!raw) goto done;
        PyList_SET_ITEM(id_bytes, id, raw);
    }
    non_rank = PyList_New(0);
    extra = PyList_New(0);
    if (!non_rank || !extra) goto done;
    for (Py_ssize_t id = 0; id < n; id++) {
        if (!skip[id]) continue;
        PyObject *number = PyLong_FromSsize_t(id);
        if (!number || PyList_Append(non_rank, number) < 0) {
            Py_XDECREF(number);
            goto done;
        }
        Py_DECREF(number);
    }
    for (int b = 0; b < 256; b++) {
        if (have_byte[b]) continue;
        PyObject *number = PyLong_FromLong(b);
        if (!number || PyList_Append(extra, number) < 0) {
            Py_XDECREF(number);
            goto done;
        }
        Py_DECREF(number);
    }
    result = PyTuple_Pack(4, id_bytes, special_ids, non_rank, extra);
    goto done;
invalid:
    if (!PyErr_Occurred()) {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    Py_XDECREF(id_bytes);
    Py_XDECREF(special_ids);
    Py_XDECREF(non_rank);
    Py_XDECREF(extra);
    table_free(&texts);
    table_free(&seen);
    free(utf8);
    free(utf8_len);
    free(text_of);
    free(last_id);
    free(special_text);
    free(produced);
    free(skip);
    free(ranked);
    free(kind_of);
    free(buffer);
    return result;
}

static PyMethodDef module_methods[] = {
    {"derive_table", derive_table, METH_VARARGS,
     "derive_table(tokens, kinds, merges) -> (id_bytes, special_ids, non_rank_ids, extra_bytes) | None"},
    {NULL, NULL, 0, NULL},
};

/* ---- module ----------------------------------------------------------------------------- */

static struct PyModuleDef bpecount_module = {
    PyModuleDef_HEAD_INIT, "engine._bpecount",
    "Exact token counts for the digits-then-GPT-2 byte-level BPE split (see engine/bpe_count.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__bpecount(void) {
    init_byte_spelling();
    for (int k = 0; k < BPE_CLASS_RANGE_COUNT && bpe_class_ranges[k].first < 128; k++) {
        for (unsigned int cp = bpe_class_ranges[k].first; cp <= bpe_class_ranges[k].last && cp < 128; cp++) {
            ascii_class[cp] = bpe_class_ranges[k].cls;
        }
    }
    if (PyType_Ready(&CounterType) < 0 || PyType_Ready(&MemoType) < 0) return NULL;
    PyObject *module = PyModule_Create(&bpecount_module);
    if (!module) return NULL;
    Py_INCREF(&CounterType);
    Py_INCREF(&MemoType);
    if (PyModule_AddObject(module, "Counter", (PyObject *)&CounterType) < 0 ||
        PyModule_AddObject(module, "Memo", (PyObject *)&MemoType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
