// llama_logits: moe_numa's probe into llama.cpp through its public API (llama.h).
//
// Built by moe_numa.bench.llama_cpp against the libllama of a llama.cpp build.
//
//   llama_logits info
//       prints llama_print_system_info() (the SIMD features ggml was built with).
//   llama_logits logits -m M.gguf (--ids-file F.int32 | --ids 1,2,3) -o OUT.f32
//                [-t THREADS] [-b BATCH] [--repack 0|1] [--kv-type f32|f16|bf16]
//                [--flash-attn 0|1] [--dump-dir DIR [--dump-filter SUBSTR]]
//       evaluates the tokens as one sequence from an empty cache, logits requested
//       at every position; writes float32 [n_tokens, n_vocab] raw to OUT and prints
//       one JSON line {"n_tokens":..,"n_vocab":..} on stdout.  With --dump-dir every
//       graph node whose name contains SUBSTR (all if none) is written as float32
//       DIR/NNNN.f32 with DIR/index.jsonl lines {file,name,op,type,ne:[ne0..ne3]}.
//   llama_logits tokenize -m M.gguf (-f TEXT | --text STR) -o OUT.int32
//                [--add-special 0|1] [--parse-special 0|1] [--split-nul 0|1]
//       loads the vocabulary only; writes int32 ids raw and prints their count.
//       With --split-nul 1 the text holds several texts separated by NUL bytes, each
//       tokenized on its own; OUT then holds, per text, its count and its ids.
//
// Defaults are the accurate settings: F32 KV cache, flash attention off, no weight
// repacking (use_extra_bufts = false).

#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static bool g_verbose = false;

static void log_cb(enum ggml_log_level level, const char * text, void *) {
    if (g_verbose || level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

[[noreturn]] static void die(const std::string & msg) {
    fprintf(stderr, "llama_logits: %s\n", msg.c_str());
    exit(2);
}

static std::string read_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) die("cannot read " + path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

static void write_file(const std::string & path, const void * data, size_t n) {
    FILE * f = fopen(path.c_str(), "wb");
    if (!f) die("cannot write " + path);
    if (n && fwrite(data, 1, n, f) != n) die("short write to " + path);
    fclose(f);
}

static ggml_type parse_kv_type(const std::string & s) {
    if (s == "f32") return GGML_TYPE_F32;
    if (s == "f16") return GGML_TYPE_F16;
    if (s == "bf16") return GGML_TYPE_BF16;
    if (s == "q8_0") return GGML_TYPE_Q8_0;
    die("unknown --kv-type " + s + " (f32, f16, bf16, q8_0)");
}

struct dump_state {
    std::string dir;
    std::string filter;
    int count = 0;
    FILE * index = nullptr;
    std::vector<float> buf;
    std::vector<uint8_t> raw;
};

static bool dump_cb(struct ggml_tensor * t, bool ask, void * ud) {
    auto * st = (dump_state *) ud;
    const char * name = ggml_get_name(t);
    bool want = st->filter.empty() || strstr(name, st->filter.c_str()) != nullptr;
    if (ask) return want;
    if (!want) return true;
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16) return true;
    const int64_t n = ggml_nelements(t);
    st->raw.resize(ggml_nbytes(t));
    ggml_backend_tensor_get(t, st->raw.data(), 0, ggml_nbytes(t));
    st->buf.resize(n);
    // walk the (possibly non-contiguous) tensor in logical order
    int64_t k = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++)
    for (int64_t i2 = 0; i2 < t->ne[2]; i2++)
    for (int64_t i1 = 0; i1 < t->ne[1]; i1++)
    for (int64_t i0 = 0; i0 < t->ne[0]; i0++) {
        size_t off = i3 * t->nb[3] + i2 * t->nb[2] + i1 * t->nb[1] + i0 * t->nb[0];
        const uint8_t * p = st->raw.data() + off;
        float v;
        if (t->type == GGML_TYPE_F32) memcpy(&v, p, 4);
        else if (t->type == GGML_TYPE_F16) v = ggml_fp16_to_fp32(*(const ggml_fp16_t *) p);
        else v = ggml_bf16_to_fp32(*(const ggml_bf16_t *) p);
        st->buf[k++] = v;
    }
    char fname[64];
    snprintf(fname, sizeof fname, "%05d.f32", st->count++);
    write_file(st->dir + "/" + fname, st->buf.data(), n * sizeof(float));
    fprintf(st->index, "{\"file\":\"%s\",\"name\":\"%s\",\"op\":\"%s\",\"type\":\"%s\","
            "\"ne\":[%lld,%lld,%lld,%lld]}\n", fname, name, ggml_op_desc(t), ggml_type_name(t->type),
            (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3]);
    fflush(st->index);
    return true;
}

struct args_t {
    std::string mode, model, out, ids_file, ids, text_file, text, kv_type = "f32", dump_dir, dump_filter;
    bool have_text = false;
    int threads = 2, batch = 0, repack = 0, flash_attn = 0, add_special = 1, parse_special = 0, split_nul = 0;
};

static args_t parse_args(int argc, char ** argv) {
    args_t a;
    if (argc < 2) die("usage: llama_logits info|logits|tokenize [options] (see the source)");
    a.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        std::string k = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) die("missing value for " + k);
            return argv[++i];
        };
        if (k == "-m") a.model = val();
        else if (k == "-o") a.out = val();
        else if (k == "--ids-file") a.ids_file = val();
        else if (k == "--ids") a.ids = val();
        else if (k == "-f") a.text_file = val();
        else if (k == "--text") { a.text = val(); a.have_text = true; }
        else if (k == "-t") a.threads = atoi(val().c_str());
        else if (k == "-b") a.batch = atoi(val().c_str());
        else if (k == "--repack") a.repack = atoi(val().c_str());
        else if (k == "--kv-type") a.kv_type = val();
        else if (k == "--flash-attn") a.flash_attn = atoi(val().c_str());
        else if (k == "--add-special") a.add_special = atoi(val().c_str());
        else if (k == "--parse-special") a.parse_special = atoi(val().c_str());
        else if (k == "--split-nul") a.split_nul = atoi(val().c_str());
        else if (k == "--dump-dir") a.dump_dir = val();
        else if (k == "--dump-filter") a.dump_filter = val();
        else if (k == "-v") g_verbose = true;
        else die("unknown argument " + k);
    }
    return a;
}

static int do_tokenize(const args_t & a) {
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model * model = llama_model_load_from_file(a.model.c_str(), mp);
    if (!model) die("cannot load the vocabulary of " + a.model);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::string all = a.have_text ? a.text : read_file(a.text_file);
    // --split-nul 1: the input holds several texts separated by NUL bytes; the output
    // is then, for each text, its int32 count followed by its int32 ids
    std::vector<std::string> texts;
    if (a.split_nul) {
        size_t start = 0;
        for (;;) {
            size_t z = all.find('\0', start);
            texts.push_back(all.substr(start, z == std::string::npos ? std::string::npos : z - start));
            if (z == std::string::npos) break;
            start = z + 1;
        }
    } else {
        texts.push_back(all);
    }
    std::vector<llama_token> out;
    int64_t total = 0;
    for (const std::string & text : texts) {
        if (text.size() > INT32_MAX) die("text too long");
        int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0,
                                   a.add_special != 0, a.parse_special != 0);
        if (n == INT32_MIN) die("tokenize overflow");
        std::vector<llama_token> ids(n < 0 ? -n : n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                           a.add_special != 0, a.parse_special != 0);
        if (n < 0) die("tokenize failed");
        ids.resize(n);
        if (a.split_nul) out.push_back(n);
        out.insert(out.end(), ids.begin(), ids.end());
        total += n;
    }
    if (!a.out.empty()) write_file(a.out, out.data(), out.size() * sizeof(llama_token));
    printf("{\"n_texts\":%zu,\"n_tokens\":%lld}\n", texts.size(), (long long) total);
    llama_model_free(model);
    return 0;
}

static std::vector<llama_token> load_ids(const args_t & a) {
    std::vector<llama_token> ids;
    if (!a.ids_file.empty()) {
        std::string raw = read_file(a.ids_file);
        if (raw.size() % 4) die("--ids-file size is not a multiple of 4 (int32 ids)");
        ids.resize(raw.size() / 4);
        memcpy(ids.data(), raw.data(), raw.size());
    } else {
        std::stringstream ss(a.ids);
        std::string tok;
        while (std::getline(ss, tok, ',')) if (!tok.empty()) ids.push_back(atoi(tok.c_str()));
    }
    if (ids.empty()) die("no token ids given (--ids-file or --ids)");
    return ids;
}

static int do_logits(const args_t & a) {
    std::vector<llama_token> ids = load_ids(a);
    const int n_tok = (int) ids.size();

    llama_model_params mp = llama_model_default_params();
    mp.use_extra_bufts = a.repack != 0;
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(a.model.c_str(), mp);
    if (!model) die("cannot load " + a.model);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (llama_token t : ids) {
        if (t < 0 || t >= n_vocab) die("token id " + std::to_string(t) + " out of range [0, " + std::to_string(n_vocab) + ")");
    }

    const int n_batch = a.batch > 0 ? std::min(a.batch, n_tok) : n_tok;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) std::max(n_tok, 16);
    cp.n_batch = (uint32_t) n_batch;
    cp.n_ubatch = (uint32_t) n_batch;
    cp.n_seq_max = 1;
    cp.n_threads = a.threads;
    cp.n_threads_batch = a.threads;
    cp.type_k = parse_kv_type(a.kv_type);
    cp.type_v = parse_kv_type(a.kv_type);
    cp.flash_attn_type = a.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    dump_state ds;
    if (!a.dump_dir.empty()) {
        ds.dir = a.dump_dir;
        ds.filter = a.dump_filter;
        ds.index = fopen((ds.dir + "/index.jsonl").c_str(), "w");
        if (!ds.index) die("cannot write " + ds.dir + "/index.jsonl");
        cp.cb_eval = dump_cb;
        cp.cb_eval_user_data = &ds;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create a context for " + a.model);

    std::vector<float> out((size_t) n_tok * n_vocab);
    llama_batch batch = llama_batch_init(n_batch, 0, 1);
    for (int start = 0; start < n_tok; start += n_batch) {
        const int n = std::min(n_batch, n_tok - start);
        batch.n_tokens = n;
        for (int i = 0; i < n; i++) {
            batch.token[i] = ids[start + i];
            batch.pos[i] = start + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        int rc = llama_decode(ctx, batch);
        if (rc != 0) die("llama_decode failed with " + std::to_string(rc) + " at token " + std::to_string(start));
        for (int i = 0; i < n; i++) {
            const float * lg = llama_get_logits_ith(ctx, i);
            if (!lg) die("no logits for position " + std::to_string(start + i));
            memcpy(&out[(size_t) (start + i) * n_vocab], lg, sizeof(float) * n_vocab);
        }
    }
    llama_batch_free(batch);
    write_file(a.out, out.data(), out.size() * sizeof(float));
    printf("{\"n_tokens\":%d,\"n_vocab\":%d,\"n_batch\":%d,\"threads\":%d,\"repack\":%d,"
           "\"kv_type\":\"%s\",\"flash_attn\":%d,\"dumped\":%d}\n",
           n_tok, n_vocab, n_batch, a.threads, a.repack, a.kv_type.c_str(), a.flash_attn, ds.count);
    if (ds.index) fclose(ds.index);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

int main(int argc, char ** argv) {
    args_t a = parse_args(argc, argv);
    llama_log_set(log_cb, nullptr);
    llama_backend_init();
    int rc;
    if (a.mode == "info") {
        printf("%s\n", llama_print_system_info());
        rc = 0;
    } else if (a.mode == "tokenize") {
        if (a.model.empty() || (a.text_file.empty() && !a.have_text)) die("tokenize needs -m and -f or --text");
        rc = do_tokenize(a);
    } else if (a.mode == "logits") {
        if (a.model.empty() || a.out.empty()) die("logits needs -m and -o");
        rc = do_logits(a);
    } else {
        die("unknown mode " + a.mode + " (info, logits, tokenize)");
    }
    llama_backend_free();
    return rc;
}
