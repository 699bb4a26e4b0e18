<?php
// The page a `fastcgi` pool serves at / (examples/apps/php.toml): PHP
// under php-fpm, started and fed by the pool's worker.
$name = htmlspecialchars($_GET['name'] ?? 'world');
?><!doctype html>
<title>PHP in a dispatcher pool</title>
<h1>Hello, <?= $name ?>, from PHP <?= PHP_VERSION ?></h1>
<p>Served by php-fpm (pid <?= getmypid() ?>) for <?= htmlspecialchars($_SERVER['REMOTE_ADDR'] ?? '?') ?>,
through a <code>fastcgi</code> pool. Try <a href="/server.php/extra/path?a=1">server.php</a>,
<code>curl -T file http://127.0.0.1:8080/upload.php</code> and
<a href="/download.php?mib=1">download.php?mib=1</a>.</p>
