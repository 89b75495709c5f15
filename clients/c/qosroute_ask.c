/*
 * qosroute_ask: a qosroute device in C on libmosquitto. Sends one JSON request to the gateway
 * (qosrouted) and prints the answer as it streams in; the gateway's latency figures (its Final
 * reply) or its error go to stderr.
 *
 *   qosroute_ask [-h host] [-p port] [-s site] [-d device] [-t task] [-m max_tokens]
 *                [-S slo_s_per_token] [-i request_id] [-w timeout_s] [-3] PROMPT
 *
 * MQTT 5 by default: the request carries a response topic of this client's own
 * (qosroute/v1/{site}/resp/{device}/{client id}) and the request id as correlation data.
 * With -3, MQTT 3.1.1: replies come on qosroute/v1/{site}/resp/{device}, matched by id.
 *
 * Exit status: 0 answered; 1 connection or timeout; 2 usage; 3 the gateway answered an error
 * (stderr: "error: code=7 no_expert: ...").
 *
 * Build: make (or: cc -O2 -Wall -o qosroute_ask qosroute_ask.c -lmosquitto)
 */
#include <mosquitto.h>
#include <mqtt_protocol.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_FIELD 8192 /* a chunk's text is at most 2048 bytes; room for anything else */
#define REORDER 64     /* chunks held while an earlier one is missing */

static const char *ERROR_NAMES[] = {
    "?", "malformed", "too_large", "unsupported_version", "invalid", "rate_limited",
    "overloaded", "no_expert", "expert_failed", "timeout", "expired", "shutting_down",
    "internal",
};

struct state {
    const char *request_topic, *reply_topic, *id;
    char *payload;
    int v5, published, finished, exit_code;
    long next_seq;
    char *held[REORDER]; /* held[k]: text of seq next_seq + k, when it came early */
    int held_done[REORDER];
    int saw_done;
};

/* ---- a small reader of flat JSON objects (the replies are one object of scalars) ---- */

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static void put_utf8(char **o, char *oend, unsigned cp)
{
    char buf[4];
    int n;
    if (cp < 0x80) { buf[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { buf[0] = (char)(0xC0 | cp >> 6); buf[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        buf[0] = (char)(0xE0 | cp >> 12); buf[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        buf[0] = (char)(0xF0 | cp >> 18); buf[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        buf[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); buf[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    if (*o + n < oend) { memcpy(*o, buf, (size_t)n); *o += n; }
}

static int hex4(const char *p, const char *end, unsigned *v)
{
    if (end - p < 4) return -1;
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        *v <<= 4;
        if (c >= '0' && c <= '9') *v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') *v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') *v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    return 0;
}

/* Reads the JSON string at p (at its opening quote) into out (unescaped, NUL-terminated);
 * returns the position after the closing quote, or NULL. */
static const char *read_string(const char *p, const char *end, char *out, size_t outlen)
{
    char *o = out, *oend = out + outlen;
    if (p >= end || *p != '"') return NULL;
    for (p++; p < end; p++) {
        char c = *p;
        if (c == '"') { *o = '\0'; return p + 1; }
        if (c != '\\') { if (o + 1 < oend) *o++ = c; continue; }
        if (++p >= end) return NULL;
        switch (*p) {
        case 'n': c = '\n'; break;
        case 't': c = '\t'; break;
        case 'r': c = '\r'; break;
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'u': {
            unsigned cp, lo;
            if (hex4(p + 1, end, &cp)) return NULL;
            p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && end - p > 6 && p[1] == '\\' && p[2] == 'u'
                && !hex4(p + 3, end, &lo) && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            put_utf8(&o, oend, cp);
            continue;
        }
        default: c = *p; break; /* \" \\ \/ */
        }
        if (o + 1 < oend) *o++ = c;
    }
    return NULL;
}

/* The value of top-level `key` of the object in json[0..len): a string unescaped, or a
 * scalar's text (number, true, false, null). Returns 1 when found. */
static int json_get(const char *json, size_t len, const char *key, char *out, size_t outlen)
{
    const char *p = json, *end = json + len;
    char name[64];
    p = skip_ws(p, end);
    if (p >= end || *p++ != '{') return 0;
    for (;;) {
        p = skip_ws(p, end);
        if (p >= end || *p == '}') return 0;
        p = read_string(p, end, name, sizeof name);
        if (!p) return 0;
        p = skip_ws(p, end);
        if (p >= end || *p++ != ':') return 0;
        p = skip_ws(p, end);
        if (p >= end) return 0;
        int wanted = strcmp(name, key) == 0;
        if (*p == '"') {
            p = read_string(p, end, wanted ? out : name, wanted ? outlen : sizeof name);
            if (!p) return 0;
            if (wanted) return 1;
        } else {
            const char *start = p;
            int depth = 0, in_str = 0;
            for (; p < end; p++) { /* a scalar, or a nested value skipped whole */
                if (in_str) { if (*p == '\\') p++; else if (*p == '"') in_str = 0; continue; }
                if (*p == '"') in_str = 1;
                else if (*p == '{' || *p == '[') depth++;
                else if (*p == '}' || *p == ']') { if (depth == 0) break; depth--; }
                else if (*p == ',' && depth == 0) break;
            }
            if (wanted) {
                size_t n = (size_t)(p - start);
                while (n && (start[n - 1] == ' ' || start[n - 1] == '\n' || start[n - 1] == '\t' || start[n - 1] == '\r')) n--;
                if (n >= outlen) n = outlen - 1;
                memcpy(out, start, n);
                out[n] = '\0';
                return 1;
            }
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') p++;
    }
}

/* ---- the request ---- */

static void append_json_string(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t need = *len + strlen(s) * 6 + 3;
    if (need > *cap) { *cap = need * 2; *buf = realloc(*buf, *cap); }
    char *o = *buf + *len;
    *o++ = '"';
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\') { *o++ = '\\'; *o++ = (char)*c; }
        else if (*c < 0x20) o += sprintf(o, "\\u%04x", *c);
        else *o++ = (char)*c;
    }
    *o++ = '"';
    *len = (size_t)(o - *buf);
}

static char *build_request(const char *id, const char *task, const char *prompt, long max_tokens, const char *slo)
{
    size_t len = 0, cap = 256;
    char *buf = malloc(cap);
    len += (size_t)sprintf(buf, "{\"v\":1,\"id\":");
    append_json_string(&buf, &len, &cap, id); /* id before prompt: the gateway can read it
                                                 even when it refuses the prompt */
    if (cap < len + 32) { cap = len + 64; buf = realloc(buf, cap); }
    len += (size_t)sprintf(buf + len, ",\"task\":");
    append_json_string(&buf, &len, &cap, task);
    if (cap < len + 32) { cap = len + 64; buf = realloc(buf, cap); }
    len += (size_t)sprintf(buf + len, ",\"prompt\":");
    append_json_string(&buf, &len, &cap, prompt);
    if (cap < len + 96) { cap = len + 128; buf = realloc(buf, cap); }
    len += (size_t)sprintf(buf + len, ",\"max_tokens\":%ld", max_tokens);
    if (slo) len += (size_t)sprintf(buf + len, ",\"slo_s_per_token\":%s", slo);
    sprintf(buf + len, ",\"stream\":true}");
    return buf;
}

/* ---- MQTT ---- */

static void on_connect(struct mosquitto *m, void *obj, int rc, int flags, const mosquitto_property *props)
{
    struct state *st = obj;
    (void)flags; (void)props;
    if (rc) {
        fprintf(stderr, "qosroute_ask: connection refused: %s\n", mosquitto_reason_string(rc));
        st->finished = 1;
        st->exit_code = 1;
        return;
    }
    /* Subscribe first; the request goes out once the subscription is acknowledged. */
    mosquitto_subscribe(m, NULL, st->reply_topic, 1);
}

static void on_subscribe(struct mosquitto *m, void *obj, int mid, int n, const int *granted)
{
    struct state *st = obj;
    (void)mid;
    if (n < 1 || granted[0] > 2) {
        fprintf(stderr, "qosroute_ask: subscription to %s refused\n", st->reply_topic);
        st->finished = 1;
        st->exit_code = 1;
        return;
    }
    if (st->published) return; /* a reconnect: the request is already out */
    mosquitto_property *props = NULL;
    if (st->v5) {
        mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, st->reply_topic);
        mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, st->id, (uint16_t)strlen(st->id));
        mosquitto_property_add_string(&props, MQTT_PROP_CONTENT_TYPE, "application/json");
    }
    int rc = mosquitto_publish_v5(m, NULL, st->request_topic, (int)strlen(st->payload), st->payload, 1, false, props);
    mosquitto_property_free_all(&props);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "qosroute_ask: publish: %s\n", mosquitto_strerror(rc));
        st->finished = 1;
        st->exit_code = 1;
        return;
    }
    st->published = 1;
}

static void emit(struct state *st, const char *text, int done)
{
    fputs(text, stdout);
    fflush(stdout);
    st->next_seq++;
    if (done) st->saw_done = 1;
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg, const mosquitto_property *props)
{
    struct state *st = obj;
    static char type[16], id[64], field[MAX_FIELD], seq_s[24], done_s[8];
    const char *json = msg->payload;
    size_t len = (size_t)msg->payloadlen;
    (void)m;
    if (st->finished) return;
    if (!json_get(json, len, "type", type, sizeof type) || !json_get(json, len, "id", id, sizeof id))
        return; /* not a reply */
    /* MQTT 5: the correlation data names the request, even in an error without an id. */
    void *corr = NULL;
    uint16_t corr_len = 0;
    if (mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false)) {
        size_t n = corr_len < sizeof id - 1 ? corr_len : sizeof id - 1;
        memcpy(id, corr, n);
        id[n] = '\0';
        free(corr);
    }
    if (strcmp(id, st->id) != 0) return; /* another request's */

    if (strcmp(type, "chunk") == 0) {
        if (!json_get(json, len, "seq", seq_s, sizeof seq_s) || !json_get(json, len, "text", field, sizeof field)
            || !json_get(json, len, "done", done_s, sizeof done_s))
            return;
        long seq = strtol(seq_s, NULL, 10);
        int done = strcmp(done_s, "true") == 0;
        long k = seq - st->next_seq;
        if (k < 0 || (k < REORDER && st->held[k])) return; /* a redelivered chunk: seen */
        if (k >= REORDER) return;
        st->held[k] = strdup(field);
        st->held_done[k] = done;
        while (st->held[0]) { /* print what is now in order */
            char *t = st->held[0];
            int d = st->held_done[0];
            memmove(st->held, st->held + 1, sizeof st->held[0] * (REORDER - 1));
            memmove(st->held_done, st->held_done + 1, sizeof st->held_done[0] * (REORDER - 1));
            st->held[REORDER - 1] = NULL;
            emit(st, t, d);
            free(t);
        }
    } else if (strcmp(type, "final") == 0) {
        char expert[80], out_tok[24], ttft[24], total[24], spt[40], met[8];
        json_get(json, len, "expert", expert, sizeof expert);
        json_get(json, len, "output_tokens", out_tok, sizeof out_tok);
        json_get(json, len, "ttft_ms", ttft, sizeof ttft);
        json_get(json, len, "total_ms", total, sizeof total);
        json_get(json, len, "s_per_token", spt, sizeof spt);
        json_get(json, len, "slo_met", met, sizeof met);
        printf("\n");
        fprintf(stderr, "final: expert=%s output_tokens=%s ttft_ms=%s total_ms=%s s_per_token=%s slo_met=%s\n",
                expert, out_tok, ttft, total, spt, met);
        st->finished = 1;
        st->exit_code = 0;
    } else if (strcmp(type, "error") == 0) {
        char code_s[16];
        json_get(json, len, "code", code_s, sizeof code_s);
        json_get(json, len, "message", field, sizeof field);
        long code = strtol(code_s, NULL, 10);
        const char *name = code >= 1 && code <= 12 ? ERROR_NAMES[code] : "unknown";
        if (st->next_seq) printf("\n");
        fprintf(stderr, "error: code=%ld %s: %s\n", code, name, field);
        st->finished = 1;
        st->exit_code = 3;
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: qosroute_ask [-h host] [-p port] [-s site] [-d device] [-t task] [-m max_tokens]\n"
            "                    [-S slo_s_per_token] [-i request_id] [-w timeout_s] [-3] PROMPT\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *site = "lab", *device = "dev-1", *task = "chat", *slo = NULL, *id = NULL;
    int port = 1883, opt;
    long max_tokens = 256;
    double timeout_s = 60;
    struct state st;
    memset(&st, 0, sizeof st);
    st.v5 = 1;
    while ((opt = getopt(argc, argv, "h:p:s:d:t:m:S:i:w:3")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 's': site = optarg; break;
        case 'd': device = optarg; break;
        case 't': task = optarg; break;
        case 'm': max_tokens = strtol(optarg, NULL, 10); break;
        case 'S': slo = optarg; break;
        case 'i': id = optarg; break;
        case 'w': timeout_s = atof(optarg); break;
        case '3': st.v5 = 0; break;
        default: usage();
        }
    }
    if (optind != argc - 1) usage();

    char id_buf[64], client_id[96], request_topic[256], reply_topic[384];
    if (!id) {
        snprintf(id_buf, sizeof id_buf, "%s-%ld-%ld", device, (long)getpid(), (long)time(NULL));
        id = id_buf;
    }
    snprintf(client_id, sizeof client_id, "qr-c-%s-%ld", device, (long)getpid());
    snprintf(request_topic, sizeof request_topic, "qosroute/v1/%s/req/%s", site, device);
    if (st.v5)
        snprintf(reply_topic, sizeof reply_topic, "qosroute/v1/%s/resp/%s/%s", site, device, client_id);
    else
        snprintf(reply_topic, sizeof reply_topic, "qosroute/v1/%s/resp/%s", site, device);
    st.request_topic = request_topic;
    st.reply_topic = reply_topic;
    st.id = id;
    st.payload = build_request(id, task, argv[optind], max_tokens, slo);
    st.exit_code = 1;

    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new(client_id, true, &st);
    if (!m) { perror("mosquitto_new"); return 1; }
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, st.v5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
    mosquitto_connect_v5_callback_set(m, on_connect);
    mosquitto_subscribe_callback_set(m, on_subscribe);
    mosquitto_message_v5_callback_set(m, on_message);
    int rc = mosquitto_connect(m, host, port, 30);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "qosroute_ask: cannot connect to %s:%d: %s\n", host, port, mosquitto_strerror(rc));
        return 1;
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (!st.finished) {
        rc = mosquitto_loop(m, 100, 1);
        if (rc != MOSQ_ERR_SUCCESS) {
            sleep(1);
            mosquitto_reconnect(m);
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((double)(now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 > timeout_s) {
            fprintf(stderr, "\nqosroute_ask: no final reply within %g s\n", timeout_s);
            st.exit_code = 1;
            break;
        }
    }
    mosquitto_disconnect(m);
    mosquitto_loop(m, 100, 1);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    free(st.payload);
    for (int k = 0; k < REORDER; k++) free(st.held[k]);
    return st.exit_code;
}
