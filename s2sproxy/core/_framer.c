/* The compiled stanza framer: the body of an XML stream (everything after the stream
 * header) cut into top-level elements, every byte checked by expat.
 *
 * s2sproxy/core/xmlstream.py is the reference and the fallback; its docstring and
 * README.md ("Design notes: the framer") say what this module must do and why it exists.  In short:
 *
 * 1. A lexer (this file) finds where each top-level element ends: tags, quoted
 *    attribute values, CDATA sections, references.  It proposes cut points; it does
 *    not decide well-formedness.
 * 2. expat (the one inside pyexpat, through the pyexpat.expat_CAPI capsule, so the
 *    compiled and the Python framer parse with the same expat) is fed each byte once,
 *    in complete tokens only: at most one Parse() per element plus one per read for
 *    the unfinished rest.  An open token is held back until the byte that can end it
 *    has arrived, so no split of the input makes expat re-tokenise (linear time).
 * 3. An element is emitted only when expat accepted its bytes and its own handlers
 *    agree: exactly one top-level element ended in that Parse() and expat is back at
 *    depth 1.  Any disagreement is a not-well-formed error, never a wrong cut.
 * 4. expat's handlers are C functions: the element's name, its attributes, its first
 *    child's namespace and its child count are read without a Python call.
 *
 * The checks are those of the Python framer: restricted XML (comments, processing
 * instructions, entity references other than the predefined ones), text between
 * top-level elements, a second stream header, max_size and max_depth.
 */

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <expat.h>
#include <pyexpat.h>

static struct PyExpat_CAPI *capi;

/* Set by configure(): the Python classes the framer makes items of. */
static PyObject *element_type;          /* xmlstream.Element (a subclass of ElementBase) */
static PyObject *parse_error_type;      /* xmlstream.ParseError */
static PyObject *stream_closed_type;    /* xmlstream.StreamClosed */
static PyObject *self_contained_fn;     /* xmlstream._self_contained(raw, prefixes) */

static PyObject *s_from, *s_to, *s_type, *s_id, *s_xml_lang;

static const char STREAM_NAME[] = "http://etherx.jabber.org/streams stream";

/* -- ElementBase: one top-level element with its original bytes ------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *name;         /* "namespace localname" */
    PyObject *attrs;        /* dict, keys as expat names them */
    PyObject *raw;          /* bytes */
    PyObject *end;          /* int: absolute index after the element */
    PyObject *child_ns;     /* str or None */
    PyObject *children;     /* int */
    PyObject *root_decls;   /* bytes */
} Element;

static void
Element_dealloc(Element *self)
{
    Py_XDECREF(self->name);
    Py_XDECREF(self->attrs);
    Py_XDECREF(self->raw);
    Py_XDECREF(self->end);
    Py_XDECREF(self->child_ns);
    Py_XDECREF(self->children);
    Py_XDECREF(self->root_decls);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Element_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "attrs", "raw", "end", "child_ns", "root_decls",
                             "children", NULL};
    PyObject *name, *attrs, *raw, *end, *child_ns, *root_decls, *children = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|O", kwlist, &name, &attrs,
                                     &raw, &end, &child_ns, &root_decls, &children))
        return NULL;
    Element *self = (Element *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(name); self->name = name;
    Py_INCREF(attrs); self->attrs = attrs;
    Py_INCREF(raw); self->raw = raw;
    Py_INCREF(end); self->end = end;
    Py_INCREF(child_ns); self->child_ns = child_ns;
    Py_INCREF(root_decls); self->root_decls = root_decls;
    self->children = children ? children : PyLong_FromLong(0);
    if (children)
        Py_INCREF(children);
    return (PyObject *)self;
}

static PyMemberDef Element_members[] = {
    {"name", T_OBJECT_EX, offsetof(Element, name), 0, NULL},
    {"attrs", T_OBJECT_EX, offsetof(Element, attrs), 0, NULL},
    {"raw", T_OBJECT_EX, offsetof(Element, raw), 0, NULL},
    {"end", T_OBJECT_EX, offsetof(Element, end), 0, NULL},
    {"child_ns", T_OBJECT_EX, offsetof(Element, child_ns), 0, NULL},
    {"children", T_OBJECT_EX, offsetof(Element, children), 0, NULL},
    {"_root_decls", T_OBJECT_EX, offsetof(Element, root_decls), 0, NULL},
    {NULL}
};

static PyTypeObject ElementType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "s2sproxy.core._framer.ElementBase",
    .tp_basicsize = sizeof(Element),
    .tp_dealloc = (destructor)Element_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The fields of xmlstream.Element, compiled.",
    .tp_members = Element_members,
    .tp_new = Element_new,
};

/* -- Framer ----------------------------------------------------------------------- */

enum lex_state {
    S_TEXT,     /* character data (between top-level elements when depth == 1) */
    S_LT,       /* after '<' */
    S_STAG,     /* in a start tag, outside quotes */
    S_QUOTE,    /* in an attribute value */
    S_ETAG,     /* in an end tag */
    S_BANG,     /* after "<!": "<![CDATA[" or "<!--" so far */
    S_CDATA,    /* in a CDATA section */
    S_REF,      /* in a reference ("&...") */
    S_EPILOG,   /* after the stream's closing tag: expat alone */
};

#define NAME_CACHE 4

/* A few recent strings, round robin: element names and namespaces repeat from stanza
 * to stanza ("jabber:server message"), and so do the JIDs in 'from' and 'to' (a
 * conversation), so the common ones are neither decoded again nor new objects (the
 * router's dict lookups on the same object hit at once).  ASCII strings of at most
 * ``max_len`` characters are remembered. */
typedef struct {
    PyObject *slot[NAME_CACHE];
    int next;
} StrCache;

typedef struct {
    PyObject_HEAD
    XML_Parser p;
    Py_ssize_t max_size;
    int max_depth;
    PyObject *replay;       /* bytes: the stream header, to prime a new expat */
    PyObject *prefixes;     /* tuple of (b"db:", b" xmlns:db='...'") */
    PyObject *root_decls;   /* bytes */

    char *buf;              /* received bytes not yet dropped */
    Py_ssize_t len, cap;
    long long base;         /* absolute index of buf[0] */
    Py_ssize_t fed;         /* buf[:fed] was given to expat */

    /* lexer */
    int state;
    Py_ssize_t pos;         /* buf[:pos] was lexed */
    int depth;              /* lexer depth: 1 between top-level elements */
    Py_ssize_t el_start;    /* where the open top-level element starts, or -1 */
    Py_ssize_t tok_start;   /* where the open token starts */
    char quote;
    int brackets;           /* ']' seen in a row in a CDATA section */

    /* what expat's handlers saw */
    int xdepth;
    int ended;              /* top-level elements ended in the current Parse() */
    int closed;             /* the root element ended */
    PyObject *el_name, *el_attrs, *el_child_ns;
    long el_children;
    const char *abort_cond; /* a handler refused the input */
    PyObject *abort_text;
    int py_error;           /* a handler hit a Python error (memory) */
    StrCache names;         /* recent element names and namespaces */
    StrCache jids;          /* recent 'from' and 'to' values */

    Py_ssize_t work;        /* bytes given to expat (the tests' linearity measure) */
    int busy;               /* inside feed() */
    PyObject *items;        /* the list feed() returns */
    PyObject *failed;       /* the ParseError, sticky */
} Framer;

static PyObject *
cached_str(StrCache *c, const char *value, Py_ssize_t n, Py_ssize_t max_len)
{
    for (int i = 0; i < NAME_CACHE; i++) {
        PyObject *s = c->slot[i];
        if (s != NULL && PyUnicode_GET_LENGTH(s) == n && PyUnicode_IS_ASCII(s)
                && memcmp(PyUnicode_DATA(s), value, n) == 0) {
            Py_INCREF(s);
            return s;
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8(value, n, "strict");
    if (s != NULL && PyUnicode_IS_ASCII(s) && n <= max_len) {
        int i = c->next;
        c->next = (i + 1) % NAME_CACHE;
        Py_XSETREF(c->slot[i], s);
        Py_INCREF(s);
    }
    return s;
}

static void
clear_cache(StrCache *c)
{
    for (int i = 0; i < NAME_CACHE; i++)
        Py_CLEAR(c->slot[i]);
}

static PyObject *
attr_key(const char *name)
{
    PyObject *k = NULL;
    switch (name[0]) {
    case 'f':
        if (strcmp(name, "from") == 0)
            k = s_from;
        break;
    case 't':
        if (strcmp(name, "to") == 0)
            k = s_to;
        else if (strcmp(name, "type") == 0)
            k = s_type;
        break;
    case 'i':
        if (strcmp(name, "id") == 0)
            k = s_id;
        break;
    case 'h':
        if (strcmp(name, "http://www.w3.org/XML/1998/namespace lang") == 0)
            k = s_xml_lang;
        break;
    }
    if (k != NULL) {
        Py_INCREF(k);
        return k;
    }
    return PyUnicode_DecodeUTF8(name, strlen(name), "strict");
}

static void
handler_abort(Framer *self, const char *cond, PyObject *text)
{
    if (self->abort_cond == NULL) {
        self->abort_cond = cond;
        self->abort_text = text;
    } else {
        Py_XDECREF(text);
    }
}

static void XMLCALL
on_start(void *data, const XML_Char *name, const XML_Char **atts)
{
    Framer *self = data;
    int depth = ++self->xdepth;
    if (self->abort_cond != NULL || self->py_error)
        return;
    if (depth == 2) {
        if (strcmp(name, STREAM_NAME) == 0) {
            handler_abort(self, "not-well-formed",
                          PyUnicode_FromString("stream header inside the stream"));
            return;
        }
        PyObject *n = cached_str(&self->names, name, strlen(name), PY_SSIZE_T_MAX);
        PyObject *attrs = PyDict_New();
        if (n == NULL || attrs == NULL)
            goto error_n;
        for (int i = 0; atts[i] != NULL; i += 2) {
            PyObject *k = attr_key(atts[i]);
            PyObject *v = (k == s_from || k == s_to) ? cached_str(&self->jids, atts[i + 1],
                                                          strlen(atts[i + 1]), 256)
                : PyUnicode_DecodeUTF8(atts[i + 1], strlen(atts[i + 1]), "strict");
            if (k == NULL || v == NULL || PyDict_SetItem(attrs, k, v) < 0) {
                Py_XDECREF(k);
                Py_XDECREF(v);
                goto error_n;
            }
            Py_DECREF(k);
            Py_DECREF(v);
        }
        Py_XSETREF(self->el_name, n);
        Py_XSETREF(self->el_attrs, attrs);
        Py_CLEAR(self->el_child_ns);
        self->el_children = 0;
        return;
error_n:
        Py_XDECREF(n);
        Py_XDECREF(attrs);
        self->py_error = 1;
        return;
    }
    if (depth == 3) {
        self->el_children++;
        if (self->el_child_ns == NULL) {
            const char *sp = strchr(name, ' ');
            self->el_child_ns = cached_str(&self->names, name, sp ? sp - name : (Py_ssize_t)strlen(name),
                                           PY_SSIZE_T_MAX);
            if (self->el_child_ns == NULL)
                self->py_error = 1;
        }
    }
    if (depth > self->max_depth + 1)
        handler_abort(self, "policy-violation",
                      PyUnicode_FromFormat("elements nested deeper than %d",
                                           self->max_depth));
}

static void XMLCALL
on_end(void *data, const XML_Char *name)
{
    Framer *self = data;
    int depth = self->xdepth--;
    if (depth == 2)
        self->ended++;
    else if (depth == 1)
        self->closed = 1;
}

static void XMLCALL
on_comment(void *data, const XML_Char *text)
{
    if (((Framer *)data)->py_error || ((Framer *)data)->abort_cond != NULL)
        return;
    handler_abort(data, "restricted-xml", PyUnicode_FromString("comment"));
}

static void XMLCALL
on_pi(void *data, const XML_Char *target, const XML_Char *text)
{
    if (((Framer *)data)->py_error || ((Framer *)data)->abort_cond != NULL)
        return;
    handler_abort(data, "restricted-xml", PyUnicode_FromString("processing instruction"));
}

static void XMLCALL
on_doctype(void *data, const XML_Char *name, const XML_Char *sysid,
           const XML_Char *pubid, int has_internal_subset)
{
    if (((Framer *)data)->py_error || ((Framer *)data)->abort_cond != NULL)
        return;
    handler_abort(data, "restricted-xml", PyUnicode_FromString("document type declaration"));
}

/* -- items and errors -------------------------------------------------------------- */

static int
fail(Framer *self, const char *cond, PyObject *text)
{
    if (text == NULL)
        return -1;
    PyObject *e = PyObject_CallFunction(parse_error_type, "sO", cond, text);
    Py_DECREF(text);
    if (e == NULL)
        return -1;
    self->failed = e;
    if (PyList_Append(self->items, e) < 0)
        return -1;
    return 0;
}

/* The condition for an expat error, as xmlstream.py maps pyexpat's codes. */
static const char *
expat_condition(enum XML_Error code)
{
    switch (code) {
    case XML_ERROR_UNDEFINED_ENTITY:
    case XML_ERROR_RECURSIVE_ENTITY_REF:
    case XML_ERROR_BINARY_ENTITY_REF:
    case XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF:
    case XML_ERROR_EXTERNAL_ENTITY_HANDLING:
    case XML_ERROR_MISPLACED_XML_PI:
        return "restricted-xml";
    case XML_ERROR_UNKNOWN_ENCODING:
    case XML_ERROR_INCORRECT_ENCODING:
        return "unsupported-encoding";
    default:
        return "not-well-formed";
    }
}

/* Give expat buf[fed:upto].  0 when it and its handlers accepted the bytes; -1 after
 * fail() (or with a Python error set). */
static int
parse_to(Framer *self, Py_ssize_t upto)
{
    Py_ssize_t n = upto - self->fed;
    if (n <= 0)
        return 0;
    self->work += n;
    enum XML_Status st = XML_STATUS_OK;
    const char *at = self->buf + self->fed;
    while (n > 0 && st == XML_STATUS_OK) {
        int chunk = n > (1 << 30) ? (1 << 30) : (int)n;
        st = capi->Parse(self->p, at, chunk, 0);
        at += chunk;
        n -= chunk;
    }
    self->fed = upto;
    if (self->py_error)
        return -1;
    if (self->abort_cond != NULL) {
        PyObject *t = self->abort_text;
        self->abort_text = NULL;
        fail(self, self->abort_cond, t);
        return -1;
    }
    if (st != XML_STATUS_OK) {
        enum XML_Error code = capi->GetErrorCode(self->p);
        /* No line or column: this expat was primed with a copy of the header, so its
         * positions are not the stream's. */
        fail(self, expat_condition(code), PyUnicode_FromString(capi->ErrorString(code)));
        return -1;
    }
    return 0;
}

/* The lexer found an error at a token starting at ``at``: expat reports an error in
 * the bytes before it first (as it would have found it first), else this one. */
static int
lex_error(Framer *self, Py_ssize_t at, const char *cond, const char *text)
{
    if (parse_to(self, at) < 0)
        return -1;
    fail(self, cond, PyUnicode_FromString(text));
    return -1;
}

/* A byte that is never legal where it stands ('<' in a tag): expat says why. */
static int
force_error(Framer *self, Py_ssize_t through)
{
    if (parse_to(self, through) < 0)
        return -1;
    fail(self, "not-well-formed", PyUnicode_FromString("malformed tag"));
    return -1;
}

/* A top-level element ended at buf[end]: let expat check it, then emit it. */
static int
element_done(Framer *self, Py_ssize_t end)
{
    if (parse_to(self, end) < 0)
        return -1;
    if (self->ended != 1 || self->xdepth != 1 || self->el_name == NULL) {
        fail(self, "not-well-formed", PyUnicode_FromString("element boundary mismatch"));
        return -1;
    }
    self->ended = 0;
    Py_ssize_t start = self->el_start;
    if (end - start > self->max_size) {
        fail(self, "policy-violation",
             PyUnicode_FromFormat("stanza larger than %zd bytes", self->max_size));
        return -1;
    }
    PyObject *raw = PyBytes_FromStringAndSize(self->buf + start, end - start);
    if (raw == NULL)
        return -1;
    Py_ssize_t np = PyTuple_GET_SIZE(self->prefixes);
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *pfx = PyTuple_GET_ITEM(PyTuple_GET_ITEM(self->prefixes, i), 0);
        if (memmem(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), PyBytes_AS_STRING(pfx),
                   PyBytes_GET_SIZE(pfx)) != NULL) {
            PyObject *r = PyObject_CallFunctionObjArgs(self_contained_fn, raw,
                                                       self->prefixes, NULL);
            Py_DECREF(raw);
            if (r == NULL)
                return -1;
            raw = r;
            break;
        }
    }
    PyTypeObject *tp = (PyTypeObject *)element_type;
    Element *el = (Element *)tp->tp_alloc(tp, 0);
    if (el == NULL) {
        Py_DECREF(raw);
        return -1;
    }
    el->name = self->el_name;
    self->el_name = NULL;
    el->attrs = self->el_attrs;
    self->el_attrs = NULL;
    el->raw = raw;
    el->end = PyLong_FromLongLong(self->base + end);
    if (self->el_child_ns != NULL) {
        el->child_ns = self->el_child_ns;
        self->el_child_ns = NULL;
    } else {
        Py_INCREF(Py_None);
        el->child_ns = Py_None;
    }
    el->children = PyLong_FromLong(self->el_children);
    Py_INCREF(self->root_decls);
    el->root_decls = self->root_decls;
    self->el_start = -1;
    int r = (el->end == NULL || el->children == NULL) ? -1
            : PyList_Append(self->items, (PyObject *)el);
    Py_DECREF(el);
    return r;
}

static int
stream_closed(Framer *self, Py_ssize_t end)
{
    if (parse_to(self, end) < 0)
        return -1;
    if (!self->closed) {
        fail(self, "not-well-formed", PyUnicode_FromString("element boundary mismatch"));
        return -1;
    }
    PyObject *c = PyObject_CallNoArgs(stream_closed_type);
    if (c == NULL)
        return -1;
    int r = PyList_Append(self->items, c);
    Py_DECREF(c);
    self->state = S_EPILOG;
    return r;
}

/* -- the lexer ------------------------------------------------------------------- */

static const char CDATA_OPEN[] = "<![CDATA[";

static inline int
is_space(char c)
{
    return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

static inline int
is_name_byte(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
           || c == '.' || c == '_' || c == ':' || c == '-' || c >= 0x80;
}

/* Text between top-level elements, at buf[at].  expat reads up to the next tag first:
 * an error there (a comment, say) is reported as the Python framer reports it, whose
 * check of the text runs at that tag. */
static void
text_between(Framer *self, Py_ssize_t at)
{
    const char *buf = self->buf;
    Py_ssize_t len = self->len, upto = at;
    while (upto < len) {
        const char *lt = memchr(buf + upto, '<', len - upto);
        upto = lt ? lt - buf : len;
        if (upto + 1 < len && buf[upto + 1] != '!' && buf[upto + 1] != '?')
            break;
        if (upto < len)
            upto++;
    }
    if (parse_to(self, upto) == 0)
        fail(self, "not-well-formed", PyUnicode_FromString("text between top-level elements"));
}

/* Lex buf[pos:len]; emits the elements that end there.  0, or -1 after fail(). */
static int
lex(Framer *self)
{
    const char *buf = self->buf;
    Py_ssize_t len = self->len;
    Py_ssize_t pos = self->pos;
    int r = 0;
    while (pos < len) {
        char c;
        switch (self->state) {
        case S_TEXT:
            if (self->depth == 1) {
                while (pos < len && is_space(buf[pos]))
                    pos++;
                if (pos == len)
                    break;
                if (buf[pos] != '<') {
                    text_between(self, pos);
                    r = -1;
                    goto out;
                }
                self->tok_start = pos++;
                self->state = S_LT;
                break;
            }
            while (pos < len && (c = buf[pos]) != '<' && c != '&')
                pos++;
            if (pos == len)
                break;
            self->tok_start = pos++;
            self->state = c == '<' ? S_LT : S_REF;
            break;
        case S_LT:
            c = buf[pos];
            if (c == '/') {
                self->state = S_ETAG;
                pos++;
            } else if (c == '?') {
                r = lex_error(self, self->tok_start, "restricted-xml",
                              "processing instruction");
                goto out;
            } else if (c == '!') {
                self->state = S_BANG;
                pos++;
            } else {
                if (self->depth == 1)
                    self->el_start = self->tok_start;
                self->state = S_STAG;
            }
            break;
        case S_STAG:
            while (pos < len && (c = buf[pos]) != '>' && c != '\'' && c != '"' && c != '<')
                pos++;
            if (pos == len)
                break;
            if (c == '<') {
                r = force_error(self, pos + 1);
                goto out;
            }
            if (c != '>') {
                self->quote = c;
                self->state = S_QUOTE;
                pos++;
                break;
            }
            pos++;
            self->state = S_TEXT;
            if (buf[pos - 2] != '/') {
                self->depth++;
            } else if (self->depth == 1) {
                self->pos = pos;
                if (element_done(self, pos) < 0) {
                    r = -1;
                    goto out;
                }
            }
            break;
        case S_QUOTE: {
            char q = self->quote;
            while (pos < len && (c = buf[pos]) != q && c != '<')
                pos++;
            if (pos == len)
                break;
            if (c == '<') {
                r = force_error(self, pos + 1);
                goto out;
            }
            pos++;
            self->state = S_STAG;
            break;
        }
        case S_ETAG:
            while (pos < len && (c = buf[pos]) != '>' && c != '<')
                pos++;
            if (pos == len)
                break;
            if (c == '<') {
                r = force_error(self, pos + 1);
                goto out;
            }
            pos++;
            self->state = S_TEXT;
            self->pos = pos;
            if (--self->depth == 1) {
                if (element_done(self, pos) < 0) {
                    r = -1;
                    goto out;
                }
            } else if (self->depth == 0) {
                if (stream_closed(self, pos) < 0) {
                    r = -1;
                    goto out;
                }
            }
            break;
        case S_BANG: {
            Py_ssize_t n = pos - self->tok_start;   /* bytes of "<!..." so far */
            c = buf[pos];
            if (n == 2 && c == '-') {
                pos++;
            } else if (self->depth == 1 && !(n == 3 && buf[self->tok_start + 2] == '-')) {
                /* "<![CDATA[" here is text between top-level elements */
                text_between(self, self->tok_start + 1);
                r = -1;
                goto out;
            } else if (n == 3 && buf[self->tok_start + 2] == '-') {
                if (c == '-') {
                    r = lex_error(self, self->tok_start, "restricted-xml", "comment");
                } else {
                    r = force_error(self, pos + 1);
                }
                goto out;
            } else if (c == CDATA_OPEN[n]) {
                pos++;
                if (n + 1 == (Py_ssize_t)sizeof(CDATA_OPEN) - 1) {
                    self->state = S_CDATA;
                    self->brackets = 0;
                }
            } else {
                r = force_error(self, pos + 1);
                goto out;
            }
            break;
        }
        case S_CDATA:
            while (pos < len) {
                c = buf[pos++];
                if (c == ']') {
                    self->brackets++;
                } else if (c == '>' && self->brackets >= 2) {
                    self->state = S_TEXT;
                    break;
                } else {
                    self->brackets = 0;
                }
            }
            break;
        case S_REF:
            if (pos == self->tok_start + 1 && buf[pos] == '#')
                pos++;
            while (pos < len && is_name_byte((unsigned char)buf[pos]))
                pos++;
            if (pos < len)
                self->state = S_TEXT;   /* the byte that ends it is lexed as text */
            break;
        case S_EPILOG:
            /* After </stream:stream>: whitespace, else an error.  A comment or PI
             * here is restricted XML, as the Python framer finds it; expat is never
             * left holding one open. */
            while (pos < len && is_space(buf[pos]))
                pos++;
            if (pos == len)
                break;
            if (buf[pos] == '<' && (len - pos == 1 || (buf[pos + 1] == '!' && len - pos < 4
                    && memcmp(buf + pos, "<!--", len - pos) == 0)))
                goto out;           /* "<", "<!", "<!-": held until what follows */
            if (buf[pos] == '<' && buf[pos + 1] == '?') {
                r = lex_error(self, pos, "restricted-xml", "processing instruction");
            } else if (buf[pos] == '<' && memcmp(buf + pos, "<!--", 4) == 0) {
                r = lex_error(self, pos, "restricted-xml", "comment");
            } else {
                if (parse_to(self, len) == 0)
                    fail(self, "not-well-formed", PyUnicode_FromString(
                         "junk after document element"));
                r = -1;
            }
            goto out;
        }
    }
out:
    self->pos = pos;
    return r;
}

/* How far expat may be fed: all but the open token (see the top of this file). */
static Py_ssize_t
safe_point(Framer *self)
{
    switch (self->state) {
    case S_TEXT:
    case S_CDATA:
    case S_EPILOG:
        return self->pos;
    default:
        return self->tok_start;
    }
}

/* -- buffer ------------------------------------------------------------------------ */

#define BIG_BUFFER (64 * 1024)

static void
trim(Framer *self)
{
    Py_ssize_t keep = self->el_start >= 0 ? self->el_start : safe_point(self);
    if (keep > self->fed)
        keep = self->fed;
    if (keep == self->len && self->cap > BIG_BUFFER) {
        /* nothing pending: a buffer grown for a large stanza is not kept */
        PyMem_Free(self->buf);
        self->buf = NULL;
        self->cap = 0;
        self->base += self->len;
        self->fed = self->pos = self->tok_start = self->len = 0;
        return;
    }
    if (keep <= 0)
        return;
    memmove(self->buf, self->buf + keep, self->len - keep);
    self->len -= keep;
    self->base += keep;
    self->fed -= keep;
    self->pos -= keep;
    self->tok_start -= keep;
    if (self->el_start >= 0)
        self->el_start -= keep;
}

static int
append(Framer *self, const char *data, Py_ssize_t n)
{
    if (self->len + n > self->cap) {
        Py_ssize_t cap = self->cap ? self->cap : 1024;
        while (cap < self->len + n)
            cap *= 2;
        char *b = PyMem_Realloc(self->buf, cap);
        if (b == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->buf = b;
        self->cap = cap;
    }
    memcpy(self->buf + self->len, data, n);
    self->len += n;
    return 0;
}

/* -- expat ------------------------------------------------------------------------- */

static int
new_expat(Framer *self)
{
    XML_Parser p = capi->ParserCreate_MM("UTF-8", NULL, " ");
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    capi->SetUserData(p, self);
    capi->SetElementHandler(p, on_start, on_end);
    capi->SetCommentHandler(p, on_comment);
    capi->SetProcessingInstructionHandler(p, on_pi);
    capi->SetStartDoctypeDeclHandler(p, on_doctype);
    self->xdepth = 0;
    if (capi->Parse(p, PyBytes_AS_STRING(self->replay), (int)PyBytes_GET_SIZE(self->replay),
                    0) != XML_STATUS_OK || self->xdepth != 1) {
        capi->ParserFree(p);
        PyErr_SetString(PyExc_ValueError, "the stream header does not parse");
        return -1;
    }
    self->p = p;
    return 0;
}

static PyObject *
Framer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"replay", "root_decls", "prefixes", "max_size", "max_depth",
                             "base", NULL};
    PyObject *replay, *root_decls, *prefixes;
    Py_ssize_t max_size;
    int max_depth;
    long long base;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SSO!niL", kwlist, &replay, &root_decls,
                                     &PyTuple_Type, &prefixes, &max_size, &max_depth,
                                     &base))
        return NULL;
    if (element_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_framer.configure() was not called");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++) {
        PyObject *t = PyTuple_GET_ITEM(prefixes, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2
                || !PyBytes_Check(PyTuple_GET_ITEM(t, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(t, 1))) {
            PyErr_SetString(PyExc_TypeError, "prefixes: a tuple of (bytes, bytes)");
            return NULL;
        }
    }
    Framer *self = (Framer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(replay); self->replay = replay;
    Py_INCREF(root_decls); self->root_decls = root_decls;
    Py_INCREF(prefixes); self->prefixes = prefixes;
    self->max_size = max_size;
    self->max_depth = max_depth;
    self->base = base;
    self->state = S_TEXT;
    self->depth = 1;
    self->el_start = -1;
    /* No expat parser and no buffer until the first byte of the body: a stream that
     * idles after its (last) header, as most do after authentication, holds neither. */
    return (PyObject *)self;
}

static void
Framer_dealloc(Framer *self)
{
    if (self->p != NULL)
        capi->ParserFree(self->p);
    PyMem_Free(self->buf);
    Py_XDECREF(self->replay);
    Py_XDECREF(self->root_decls);
    Py_XDECREF(self->prefixes);
    Py_XDECREF(self->el_name);
    Py_XDECREF(self->el_attrs);
    Py_XDECREF(self->el_child_ns);
    Py_XDECREF(self->abort_text);
    Py_XDECREF(self->items);
    Py_XDECREF(self->failed);
    clear_cache(&self->names);
    clear_cache(&self->jids);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Framer_feed(Framer *self, PyObject *arg)
{
    if (self->py_error || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, self->busy ? "Framer.feed re-entered"
                        : "the framer failed (out of memory) and cannot go on");
        return NULL;
    }
    if (self->failed != NULL) {
        PyObject *l = PyList_New(1);
        if (l != NULL) {
            Py_INCREF(self->failed);
            PyList_SET_ITEM(l, 0, self->failed);
        }
        return l;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len > INT_MAX / 2) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "read too large");
        return NULL;
    }
    PyObject *items = PyList_New(0);
    if (items == NULL || view.len == 0) {
        PyBuffer_Release(&view);
        return items;
    }
    if (self->p == NULL && new_expat(self) < 0) {
        PyBuffer_Release(&view);
        Py_XDECREF(items);
        return NULL;
    }
    Py_XSETREF(self->items, items);
    trim(self);
    int r = append(self, view.buf, view.len);
    PyBuffer_Release(&view);
    if (r < 0) {
        self->py_error = 1;
        return NULL;
    }
    self->busy = 1;         /* lex() calls Python (item classes): no re-entry */
    if (lex(self) == 0 && parse_to(self, safe_point(self)) == 0) {
        if (self->ended != 0 || (self->state != S_EPILOG && self->xdepth < 1))
            fail(self, "not-well-formed", PyUnicode_FromString("element boundary mismatch"));
        else if (self->el_start >= 0 && self->len - self->el_start > self->max_size)
            fail(self, "policy-violation",
                 PyUnicode_FromFormat("stanza larger than %zd bytes", self->max_size));
        else if (self->el_start < 0 && safe_point(self) < self->len
                 && self->len - safe_point(self) > self->max_size)
            /* an end tag (</stream:stream...) or "<!" held between elements */
            fail(self, "policy-violation",
                 PyUnicode_FromFormat("tag larger than %zd bytes", self->max_size));
    }
    self->busy = 0;
    self->items = NULL;
    if (PyErr_Occurred()) {
        self->py_error = 1;     /* sticky: the state is not to be trusted any more */
        Py_DECREF(items);
        return NULL;
    }
    return items;
}

static PyObject *
Framer_leftover(Framer *self, PyObject *arg)
{
    long long end = PyLong_AsLongLong(arg);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t rel = end - self->base;
    if (rel < 0)
        rel = 0;
    if (rel > self->len)
        rel = self->len;
    return PyBytes_FromStringAndSize(self->buf + rel, self->len - rel);
}

static PyObject *
Framer_release(Framer *self, PyObject *unused)
{
    if (self->busy)
        Py_RETURN_FALSE;
    if (self->p == NULL)
        Py_RETURN_TRUE;
    if (self->failed != NULL || self->state != S_TEXT || self->depth != 1
            || self->el_start >= 0 || self->fed != self->len)
        Py_RETURN_FALSE;
    capi->ParserFree(self->p);
    self->p = NULL;
    /* everything received was whitespace after the last element: drop it */
    self->base += self->len;
    self->len = self->fed = self->pos = self->tok_start = 0;
    PyMem_Free(self->buf);
    self->buf = NULL;
    self->cap = 0;
    clear_cache(&self->names);
    clear_cache(&self->jids);
    Py_RETURN_TRUE;
}

static PyMemberDef Framer_members[] = {
    {"max_size", T_PYSSIZET, offsetof(Framer, max_size), 0,
     "The stanza size limit (raised once a stream is authenticated)."},
    {"work", T_PYSSIZET, offsetof(Framer, work), READONLY,
     "Bytes given to expat so far (each received byte once)."},
    {"buffered", T_PYSSIZET, offsetof(Framer, len), READONLY,
     "Bytes held: the open element and the unparsed tail."},
    {NULL}
};

static PyObject *
Framer_holds_parser(Framer *self, void *unused)
{
    return PyBool_FromLong(self->p != NULL);
}

static PyGetSetDef Framer_getset[] = {
    {"holds_parser", (getter)Framer_holds_parser, NULL,
     "Whether an expat parser is held (not released).", NULL},
    {NULL}
};

static PyMethodDef Framer_methods[] = {
    {"feed", (PyCFunction)Framer_feed, METH_O, "Bytes in, items out."},
    {"leftover", (PyCFunction)Framer_leftover, METH_O,
     "Bytes received after absolute index end."},
    {"release", (PyCFunction)Framer_release, METH_NOARGS,
     "Drop the expat parser while nothing is half-parsed.  True if released."},
    {NULL}
};

static PyTypeObject FramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "s2sproxy.core._framer.Framer",
    .tp_basicsize = sizeof(Framer),
    .tp_dealloc = (destructor)Framer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The body of one XML stream, after its header.",
    .tp_methods = Framer_methods,
    .tp_members = Framer_members,
    .tp_getset = Framer_getset,
    .tp_new = Framer_new,
};

/* -- module ------------------------------------------------------------------------ */

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *el, *pe, *sc, *fn;
    if (!PyArg_ParseTuple(args, "O!OOO", &PyType_Type, &el, &pe, &sc, &fn))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)el, &ElementType)
            || ((PyTypeObject *)el)->tp_basicsize != ElementType.tp_basicsize) {
        PyErr_SetString(PyExc_TypeError,
                        "the element class must add no fields to ElementBase");
        return NULL;
    }
    Py_INCREF(el); Py_XSETREF(element_type, el);
    Py_INCREF(pe); Py_XSETREF(parse_error_type, pe);
    Py_INCREF(sc); Py_XSETREF(stream_closed_type, sc);
    Py_INCREF(fn); Py_XSETREF(self_contained_fn, fn);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Element, ParseError, StreamClosed, self_contained)"},
    {NULL}
};

static struct PyModuleDef framer_module = {
    PyModuleDef_HEAD_INIT, "_framer", "The compiled stanza framer (see _framer.c).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__framer(void)
{
    capi = PyCapsule_Import(PyExpat_CAPSULE_NAME, 0);
    if (capi == NULL)
        return NULL;
    if (strcmp(capi->magic, PyExpat_CAPI_MAGIC) != 0
            || (size_t)capi->size < offsetof(struct PyExpat_CAPI, SetHashSalt)) {
        PyErr_SetString(PyExc_ImportError, "pyexpat.expat_CAPI is not the expected one");
        return NULL;
    }
    if (PyType_Ready(&ElementType) < 0 || PyType_Ready(&FramerType) < 0)
        return NULL;
    s_from = PyUnicode_InternFromString("from");
    s_to = PyUnicode_InternFromString("to");
    s_type = PyUnicode_InternFromString("type");
    s_id = PyUnicode_InternFromString("id");
    s_xml_lang = PyUnicode_InternFromString("http://www.w3.org/XML/1998/namespace lang");
    PyObject *m = PyModule_Create(&framer_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ElementType);
    Py_INCREF(&FramerType);
    if (PyModule_AddObject(m, "ElementBase", (PyObject *)&ElementType) < 0
            || PyModule_AddObject(m, "Framer", (PyObject *)&FramerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
