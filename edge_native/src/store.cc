// Prepared statements inside explicit transactions; every failure is an exception naming the database.
#include "store.h"

#include <sqlite3.h>
#include <sys/stat.h>

#include <cstring>
#include <stdexcept>

namespace fedcache {

namespace {

constexpr const char* kSchema =
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS outbox (sample INTEGER PRIMARY KEY, logits BLOB NOT NULL, cid INTEGER);"
    "CREATE TABLE IF NOT EXISTS teachers (sample INTEGER PRIMARY KEY, logits BLOB NOT NULL);"
    "CREATE TABLE IF NOT EXISTS acked (sample INTEGER PRIMARY KEY, version INTEGER NOT NULL, logits BLOB NOT NULL);";

class Statement {
 public:
  Statement(sqlite3* db, const char* sql, const std::string& path) : path_(path) {
    if (sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr) != SQLITE_OK)
      throw std::runtime_error(path + ": " + sqlite3_errmsg(db));
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement& bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); return *this; }
  Statement& bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), int(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& blob(int i, const void* data, size_t n) {
    sqlite3_bind_blob(stmt_, i, data, int(n), SQLITE_TRANSIENT);
    return *this;
  }
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc != SQLITE_DONE) throw std::runtime_error(path_ + ": " + sqlite3_errmsg(sqlite3_db_handle(stmt_)));
    return false;
  }
  void run() {
    step();
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  int64_t integer(int col) { return sqlite3_column_int64(stmt_, col); }
  const void* blob_at(int col, size_t* n) {
    *n = size_t(sqlite3_column_bytes(stmt_, col));
    return sqlite3_column_blob(stmt_, col);
  }

 private:
  sqlite3_stmt* stmt_ = nullptr;
  std::string path_;
};

}  // namespace

DeviceStore::DeviceStore(const std::string& directory, int classes) : classes_(classes) {
  ::mkdir(directory.c_str(), 0755);
  path_ = directory + "/device.sqlite3";
  if (sqlite3_open(path_.c_str(), &db_) != SQLITE_OK) {
    const std::string why = db_ ? sqlite3_errmsg(db_) : "out of memory";
    sqlite3_close(db_);
    throw std::runtime_error(path_ + ": " + why);
  }
  sqlite3_busy_timeout(db_, 5000);
  exec("PRAGMA journal_mode=WAL");
  exec("PRAGMA synchronous=NORMAL");
  exec(kSchema);
  // Updates sent before a crash were never acknowledged to us: they go out again.
  exec("UPDATE outbox SET cid = NULL WHERE cid IS NOT NULL");
}

DeviceStore::~DeviceStore() { sqlite3_close(db_); }

void DeviceStore::exec(const char* sql) {
  char* error = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &error) != SQLITE_OK) {
    const std::string why = error ? error : "unknown error";
    sqlite3_free(error);
    throw std::runtime_error(path_ + ": " + why);
  }
}

int64_t DeviceStore::get(const std::string& key, int64_t fallback) {
  Statement s(db_, "SELECT value FROM meta WHERE key = ?", path_);
  s.bind(1, key);
  return s.step() ? s.integer(0) : fallback;
}

void DeviceStore::put(const std::string& key, int64_t value) {
  Statement s(db_, "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", path_);
  s.bind(1, key).bind(2, value).run();
}

void DeviceStore::outbox_put(const uint32_t* ids, const float* logits, size_t n) {
  exec("BEGIN");
  try {
    Statement s(db_,
                "INSERT INTO outbox (sample, logits, cid) VALUES (?, ?, NULL) "
                "ON CONFLICT(sample) DO UPDATE SET logits = excluded.logits, cid = NULL",
                path_);
    for (size_t i = 0; i < n; ++i) s.bind(1, ids[i]).blob(2, logits + i * size_t(classes_), size_t(classes_) * 4).run();
    exec("COMMIT");
  } catch (...) {
    exec("ROLLBACK");
    throw;
  }
}

Rows DeviceStore::outbox_take(size_t limit, uint64_t cid) {
  Rows rows;
  exec("BEGIN");
  try {
    Statement q(db_, "SELECT sample, logits FROM outbox WHERE cid IS NULL ORDER BY sample LIMIT ?", path_);
    q.bind(1, int64_t(limit));
    while (q.step()) {
      size_t n = 0;
      const auto* data = static_cast<const float*>(q.blob_at(1, &n));
      if (n != size_t(classes_) * 4) throw std::runtime_error(path_ + ": an outbox row has the wrong width");
      rows.ids.push_back(uint32_t(q.integer(0)));
      rows.logits.insert(rows.logits.end(), data, data + classes_);
    }
    Statement u(db_, "UPDATE outbox SET cid = ? WHERE sample = ?", path_);
    for (uint32_t id : rows.ids) u.bind(1, int64_t(cid)).bind(2, id).run();
    exec("COMMIT");
  } catch (...) {
    exec("ROLLBACK");
    throw;
  }
  return rows;
}

void DeviceStore::outbox_acknowledged(uint64_t cid, uint64_t version, const Rows& held) {
  exec("BEGIN");
  try {
    Statement d(db_, "DELETE FROM outbox WHERE cid = ?", path_);
    d.bind(1, int64_t(cid)).run();
    Statement a(db_,
                "INSERT INTO acked VALUES (?, ?, ?) ON CONFLICT(sample) DO UPDATE SET version = excluded.version, "
                "logits = excluded.logits WHERE excluded.version > acked.version",
                path_);
    for (size_t i = 0; i < held.ids.size(); ++i)
      a.bind(1, held.ids[i]).bind(2, int64_t(version)).blob(3, held.logits.data() + i * size_t(classes_),
                                                             size_t(classes_) * 4).run();
    exec("COMMIT");
  } catch (...) {
    exec("ROLLBACK");
    throw;
  }
}

void DeviceStore::outbox_release(uint64_t cid) {
  Statement s(db_, "UPDATE outbox SET cid = NULL WHERE cid = ?", path_);
  s.bind(1, int64_t(cid)).run();
}

int64_t DeviceStore::outbox_size() {
  Statement s(db_, "SELECT COUNT(*) FROM outbox", path_);
  return s.step() ? s.integer(0) : 0;
}

void DeviceStore::save_teachers(const Rows& teachers) {
  exec("BEGIN");
  try {
    Statement s(db_, "INSERT INTO teachers VALUES (?, ?) ON CONFLICT(sample) DO UPDATE SET logits = excluded.logits",
                path_);
    for (size_t i = 0; i < teachers.ids.size(); ++i)
      s.bind(1, teachers.ids[i]).blob(2, teachers.logits.data() + i * size_t(classes_), size_t(classes_) * 4).run();
    exec("COMMIT");
  } catch (...) {
    exec("ROLLBACK");
    throw;
  }
}

Rows DeviceStore::load_teachers() {
  Rows rows;
  Statement q(db_, "SELECT sample, logits FROM teachers", path_);
  while (q.step()) {
    size_t n = 0;
    const auto* data = static_cast<const float*>(q.blob_at(1, &n));
    if (n != size_t(classes_) * 4) continue;  // a teacher of another class count: not ours to use
    rows.ids.push_back(uint32_t(q.integer(0)));
    rows.logits.insert(rows.logits.end(), data, data + classes_);
  }
  return rows;
}

}  // namespace fedcache
